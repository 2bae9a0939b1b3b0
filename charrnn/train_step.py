"""The train step: optimizer, learning-rate schedule, and the one jitted
``train_step(state, carry, batch) -> (state, carry, metrics)``, pure and built once per run."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from charrnn import parallel, prng
from charrnn.config import TrainConfig
from charrnn.errors import CharrnnError
from charrnn.evaluate import compute_dtype, weighted_nll
from charrnn.model import CharRNN, split_model
from charrnn.vocab import START


class TrainState(NamedTuple):
    """Everything a training step reads and writes (a pytree; donated to the step)."""

    params: Any
    opt_state: Any
    step: jax.Array  # int32: optimizer steps taken
    rng: jax.Array  # uint32[2]: base key; dropout at step s uses fold_in(rng, s)


def lr_schedule(cfg: TrainConfig, total_steps: Optional[int]) -> optax.Schedule:
    """The learning rate at each step: linear warm-up, then constant, cosine or exponential decay.

    Cosine decays to a tenth of ``lr`` at ``total_steps``; exponential multiplies by 0.1 over
    the same span. Both need a known length (``--max-steps`` or ``--epochs``).
    """
    warm = cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    else:
        if total_steps is None:
            raise CharrnnError(f"--lr-schedule {cfg.lr_schedule} needs a known length: "
                               f"pass --max-steps or --epochs")
        span = max(1, total_steps - warm)
        if cfg.lr_schedule == "cosine":
            main = optax.cosine_decay_schedule(cfg.lr, span, alpha=0.1)
        else:
            main = optax.exponential_decay(cfg.lr, span, decay_rate=0.1)
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(cfg.lr / warm, cfg.lr, warm), main], [warm])


def make_optimizer(cfg: TrainConfig, lr: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """Gradient clipping by global norm (``grad_clip`` > 0) followed by the chosen optimizer."""
    if cfg.optimizer == "adam":
        opt = optax.adam(lr)
    elif cfg.optimizer == "adamw":
        opt = optax.adamw(lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "rmsprop":
        opt = optax.rmsprop(lr, decay=0.95)  # char-rnn's decay rate
    else:
        opt = optax.sgd(lr, momentum=0.9)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt


def init_state(model: CharRNN, optimizer: optax.GradientTransformation, seed: int):
    """``(graphdef, state)`` for a fresh run: parameters from the model, optimizer state, step 0."""
    graphdef, params = split_model(model)
    state = TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32),
                       rng=run_keys(seed)["dropout"])
    return graphdef, state


def run_keys(seed: int) -> dict[str, jax.Array]:
    """The run's named PRNG keys, all split once from ``seed`` (``prng.key_from_seed``: every
    seed in [0, 2**64) its own key; below 2**32 the key ``jax.random.PRNGKey`` gives)."""
    init, dropout, sample = jax.random.split(jnp.asarray(prng.key_from_seed(seed)), 3)
    return {"init": init, "dropout": dropout, "sample": sample}


def _reset_where(carry, reset):
    return jax.tree_util.tree_map(lambda c: jnp.where(reset, jnp.zeros_like(c), c), carry)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, cfg: TrainConfig,
                    *, jit: bool = True, labelled: bool = False):
    """Build ``train_step(state, carry, batch) -> (state, carry, metrics)``.

    ``batch`` is ``(x_BxT, y_BxT, reset)``, for a ``labelled`` model ``(x_BxT, y_BxT, reset,
    labels_BxT)`` (each input's label); ``reset`` zeroes the carried state first (epoch
    start). The loss is the mean cross-entropy in nats over the targets that are characters or
    the end token (a start token always follows an end token, so it is not scored). A step whose
    loss, gradient or new parameters are not finite changes nothing but the bad-step counter, and
    resets the carry.

    With more than one device the step runs under ``shard_map`` on ``parallel.data_mesh()``
    (state replicated, batch rows and carry split, as ``parallel.DataParallel`` places them):
    each device runs the forward and backward pass on its own rows and the gradients are
    summed with one ``psum`` per step; every device then applies the same update. (Left to
    automatic sharding, the same program ran the devices nearly in lockstep and gained ~10%;
    with ``shard_map`` two CPU devices on two cores train ~1.9x as fast as one.) The loss is
    the same function of the whole batch as on one device, dropout masks included.
    """
    dtype = compute_dtype(cfg.dtype)
    mesh = parallel.data_mesh()
    split = mesh.size > 1

    def loss_fn(params, carry, x_BxT, y_BxT, key, rows, labels_BxT):
        model = nnx.merge(graphdef, params)
        carry, logits_BxTxV = model(carry, x_BxT, labels_BxT, dropout_key=key, dtype=dtype, dropout_rows=rows)
        total, _ = weighted_nll(logits_BxTxV, y_BxT, (y_BxT != START).astype(jnp.float32))
        return total, carry

    def train_step(state: TrainState, carry, batch):
        x_BxT, y_BxT, reset = batch[:3]
        labels_BxT = batch[3] if labelled else None
        carry = _reset_where(carry, reset)
        key = jax.random.fold_in(state.rng, state.step)
        count = jnp.sum((y_BxT != START).astype(jnp.float32))
        rows = None
        if split:  # this device's rows of the whole batch; the loss is over the whole batch
            rows = (jax.lax.axis_index(parallel.AXIS) * x_BxT.shape[0], x_BxT.shape[0] * mesh.size)
        # The summed loss and its gradient, divided by the batch's target count only after the
        # devices' sums are added: one all-reduce per step. (A psum of the count before the
        # forward pass made each device wait there for the other, whichever XLA ran first.)
        (total, new_carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, carry, x_BxT, y_BxT, key, rows, labels_BxT)
        if split:
            total, grads, count = jax.lax.psum((total, grads, count), parallel.AXIS)
        count = jnp.maximum(count, 1.0)
        loss = total / count
        grads = jax.tree_util.tree_map(lambda g: g * (1.0 / count), grads)
        new_carry = jax.lax.stop_gradient(new_carry)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # The new parameters too: a huge learning rate makes them overflow from finite gradients.
        # (With a finite gradient norm the optimizer's moments stay finite.)
        params_ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(params)]))
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_ok
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        state = TrainState(
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            step=state.step + 1,
            rng=state.rng,
        )
        new_carry = _reset_where(new_carry, ~ok)
        metrics = {"loss": loss, "grad_norm": grad_norm, "ok": ok}
        return state, new_carry, metrics

    if split:
        rows_spec = P(parallel.AXIS)
        # check_vma=False: the replicated outputs (state, metrics) are computed from psum'd
        # values, so they are equal on every device; the check cannot see through the
        # cells' custom_vjp.
        batch_spec = (rows_spec, rows_spec, P()) + ((rows_spec,) if labelled else ())
        train_step = jax.shard_map(train_step, mesh=mesh, in_specs=(P(), rows_spec, batch_spec),
                                   out_specs=(P(), rows_spec, P()), check_vma=False)
    return jax.jit(train_step, donate_argnums=(0, 1)) if jit else train_step
