"""Channel plan of the face-adapted DenseNet (docs/backbones.md), shared by both twins and the MACs counter."""


def dense_stages(init, growth, blocks):
    """[(channels in, channels out, transition out or None)] per dense block.

    Each dense layer appends `growth` channels to its input; a transition (every block but the last) halves
    them (DenseNet-BC compression 0.5, as fdensenet).
    """
    stages, channels = [], init
    for i, layers in enumerate(blocks):
        out = channels + layers * growth
        halved = out // 2 if i < len(blocks) - 1 else None
        stages.append((channels, out, halved))
        channels = halved or out
    return stages


def final_channels(kwargs):
    """Channels of the last dense block's map (1024 for DenseNet-121) for registry `kwargs`."""
    return dense_stages(kwargs["init"], kwargs["growth"], kwargs["blocks"])[-1][1]
