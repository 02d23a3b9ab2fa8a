"""TensorBoard event files without torch or TensorFlow: both twins log through this one writer."""
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class TensorBoard:
    def __init__(self, logdir: str, purge_from: int = None):
        """purge_from: a resumed run's first step. Events a killed run logged past its checkpoint are replayed by
        the resumed run; a SessionLog START at that step makes TensorBoard drop the stale ones (as torch's
        SummaryWriter(purge_step=...) does), so each step is shown once."""
        self._writer = EventFileWriter(logdir)
        if purge_from is not None:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(purge_from), session_log=start))

    def _add(self, summary, step):
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def scalar(self, tag: str, value: float, step: int):
        self._add(summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))]), step)

    def image_png(self, tag: str, png: bytes, height: int, width: int, step: int):
        image = summary_pb2.Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
        self._add(summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, image=image)]), step)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()
