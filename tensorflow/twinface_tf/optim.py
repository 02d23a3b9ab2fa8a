"""torch.optim.SGD and torch.optim.AdamW semantics as Keras optimizers, so both twins take identical steps.

Keras' own SGD keeps lr inside the velocity and decays weights decoupled; Keras' AdamW places eps differently.
Both drift from torch once lr changes between steps, hence these. The caller sets lr before each step:
`optimizer.learning_rate.assign(lr)`. Weight decay applies to every variable the optimizer is given (as
arcface_torch); frozen variables (features gamma) are not trainable, get no gradient and stay untouched.
"""
import keras
import tensorflow as tf


class SGD(keras.optimizers.Optimizer):
    """torch.optim.SGD(dampening=0, nesterov=False): g = grad + wd * p; buf = momentum * buf + g; p -= lr * buf.

    torch starts buf at g; a zero-initialised buffer gives exactly that on the first step.
    """

    def __init__(self, learning_rate=0.1, momentum=0.9, weight_decay=5e-4, name="sgd", **kwargs):
        # weight_decay is kept away from the base class, which would apply it decoupled.
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)
        self.torch_weight_decay = float(weight_decay)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentum_buffers = [self.add_variable_from_reference(v, "momentum_buffer") for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        lr = tf.cast(learning_rate, variable.dtype)
        buf = self.momentum_buffers[self._get_variable_index(variable)]
        new_buf = self.momentum * buf + (gradient + self.torch_weight_decay * variable)
        self.assign(buf, new_buf)
        self.assign_sub(variable, lr * new_buf)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "weight_decay": self.torch_weight_decay}


class AdamW(keras.optimizers.Optimizer):
    """torch.optim.AdamW(amsgrad=False): p *= 1 - lr * wd; m, v moments; bias corrections from a per-variable
    step count (torch keeps one per parameter); p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
    """

    def __init__(self, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-8, weight_decay=1e-2,
                 name="adamw", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_1, self.beta_2, self.epsilon = float(beta_1), float(beta_2), float(epsilon)
        self.torch_weight_decay = float(weight_decay)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.exp_avgs = [self.add_variable_from_reference(v, "exp_avg") for v in variables]
        self.exp_avg_sqs = [self.add_variable_from_reference(v, "exp_avg_sq") for v in variables]
        self.steps = [self.add_variable((), dtype="int64", name=f"{v.path.replace('/', '_')}_step")
                      for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        m, v, step = self.exp_avgs[index], self.exp_avg_sqs[index], self.steps[index]
        self.assign_add(step, 1)
        # Scalars in float64 like torch's Python floats, then cast once.
        lr = tf.cast(learning_rate, "float64")
        t = tf.cast(step, "float64")
        decay = tf.cast(1.0 - lr * self.torch_weight_decay, variable.dtype)
        step_size = tf.cast(lr / (1.0 - self.beta_1 ** t), variable.dtype)
        bias_correction2_sqrt = tf.cast(tf.sqrt(1.0 - self.beta_2 ** t), variable.dtype)

        self.assign(variable, variable * decay)
        new_m = m + (1.0 - self.beta_1) * (gradient - m)        # torch: exp_avg.lerp_(grad, 1 - beta1)
        new_v = self.beta_2 * v + (1.0 - self.beta_2) * gradient * gradient
        self.assign(m, new_m)
        self.assign(v, new_v)
        self.assign_sub(variable, step_size * new_m / (tf.sqrt(new_v) / bias_correction2_sqrt + self.epsilon))

    def get_config(self):
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon,
                "weight_decay": self.torch_weight_decay}


def build_optimizer(name, params, lr, momentum=0.9, weight_decay=5e-4, betas=(0.9, 0.999), eps=1e-8):
    """"sgd" or "adamw" with torch semantics, built on `params` (a list of trainable variables)."""
    if name == "sgd":
        optimizer = SGD(lr, momentum=momentum, weight_decay=weight_decay)
    elif name == "adamw":
        optimizer = AdamW(lr, beta_1=betas[0], beta_2=betas[1], epsilon=eps, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {name!r}; known: adamw, sgd")
    optimizer.build(list(params))
    return optimizer
