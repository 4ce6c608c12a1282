"""Data-parallel training over MPI (mpi4py): each rank's share of a batch, and the few
collectives a training step needs, each with a deadline.

Every rank is given the same global batch [B,T,...] and trains on its contiguous share of the
rows (:meth:`MPIGroup.rows`). Its loss and gradients are scaled by its share of the loss's
normaliser (:func:`loss_fraction`), so that their sum over the ranks -- one in-place allreduce
of the flat gradient, the loss riding in one slot after it -- is the loss and gradient one
process computes on the whole batch, up to rounding. Clipping and the optimizer's update come
after that sum, on every rank alike, so parameters and optimizer state stay identical.

A rank failure ends the job with an error on every rank instead of a hang: a rank whose step,
callback or checkpoint raises tells the others (a message on a communicator of its own) before
its error propagates, as does a rank whose program ends while the group is still in use, and a
rank waiting in a collective polls for such messages while it waits; one that waits longer than
``timeout`` (MPI collectives have no timeout of their own) raises :class:`DistributedError` and
aborts the job when its process exits, so that a rank that hangs is ended too. Every rank must
make the same collective calls in the same order: ``fit``, ``evaluate``, ``save`` and ``load``
on every rank, and ``stop_training`` set alike on all of them.

``import rnnkern`` never imports mpi4py: :class:`MPIGroup` does, when it is made.

Shape legend: B rows of the global batch, B_r this rank's rows, T time steps, P parameters.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from .losses import _EPS, sequence_loss, sum_squares

__all__ = ["DistributedError", "MPIGroup", "resolve", "loss_fraction", "Shard", "shard_batch",
           "split_streams"]

INSTALL_HINT = 'pip install "rnnkern[mpi]"'
DEFAULT_TIMEOUT = 300.0     # seconds a rank waits in one collective; RNNKERN_MPI_TIMEOUT sets it
_NOTICE_TAG = 7201          # the failure notice's tag on the notice communicator
_SPIN_S = 1.0               # a wait polls flat out this long, yielding the CPU between polls,
_NAP_S = 1e-3               # then naps this long between polls (a peer writing a checkpoint)
_WHAT = {"allreduce": "a step's gradient allreduce", "reduce": "a sum over the ranks",
         "broadcast": "a broadcast from rank 0"}


class DistributedError(RuntimeError):
    """Data-parallel training stopped: another rank failed (its error is named) or ended its
    program while this one waited, or no answer came from the other ranks within the group's
    timeout."""


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f'distributed="mpi" needs mpi4py and an MPI library: {INSTALL_HINT} '
                          f"(the mpich wheel brings mpiexec) -- {exc}") from exc
    return MPI


def resolve(distributed):
    """``distributed`` as :class:`TrainStep`/:class:`Trainer` take it: None (one process), "mpi"
    (a new :class:`MPIGroup` over ``MPI.COMM_WORLD``) or an :class:`MPIGroup`."""
    if distributed is None or isinstance(distributed, MPIGroup):
        return distributed
    if isinstance(distributed, str) and distributed == "mpi":
        return MPIGroup()
    raise ValueError(f"distributed must be None, 'mpi' or an rnnkern.distributed.MPIGroup, "
                     f"got {distributed!r}")


class MPIGroup:
    """The ranks of a data-parallel job and its collectives.

    Args:
        comm:    an mpi4py communicator (default ``MPI.COMM_WORLD``); the group works on
                 duplicates of it, so other traffic on ``comm`` cannot mix with its own
        timeout: seconds one collective may wait for the other ranks before raising
                 :class:`DistributedError` (default: ``RNNKERN_MPI_TIMEOUT`` or 300)

    Made on every rank, in the same order (duplicating ``comm`` is collective). ``rank``,
    ``size``, ``is_root`` (rank 0); ``timings``: seconds spent waiting in each kind of
    collective and how many ran (``"allreduce"``: the gradient allreduces of the steps).
    """

    def __init__(self, comm=None, *, timeout=None):
        MPI = self._MPI = _mpi()
        base = MPI.COMM_WORLD if comm is None else comm
        if timeout is None:
            timeout = float(os.environ.get("RNNKERN_MPI_TIMEOUT", DEFAULT_TIMEOUT))
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self._comm = base.Dup()       # the collectives
        self._notices = base.Dup()    # failure notices, point to point
        self.rank, self.size = self._comm.Get_rank(), self._comm.Get_size()
        self.is_root = self.rank == 0
        self.broken = None            # why the group can no longer be used, once it cannot
        self._sent = []               # notice requests in flight
        self.timings = {"allreduce": [0.0, 0], "reduce": [0.0, 0], "broadcast": [0.0, 0]}
        atexit.register(self._notify, "exited", None)   # a rank that leaves early says so

    def __repr__(self):
        return f"MPIGroup(rank {self.rank} of {self.size}, timeout {self.timeout:g} s)"

    def ranks_on_this_node(self):
        """How many ranks of the group share this machine (to divide its CPUs among them)."""
        node = self._comm.Split_type(self._MPI.COMM_TYPE_SHARED)
        try:
            return node.Get_size()
        finally:
            node.Free()

    # ---------------------------------------------------------------- shares
    def rows(self, B):
        """This rank's contiguous share of a batch of ``B`` rows, as a slice: the first
        ``B % size`` ranks take one row more than the others."""
        if B < self.size:
            raise ValueError(f"a batch of {B} rows cannot be shared by {self.size} ranks: "
                             f"every rank needs at least one row (give batches of at least "
                             f"{self.size} rows, or run fewer ranks)")
        base, extra = divmod(B, self.size)
        lo = self.rank * base + min(self.rank, extra)
        return slice(lo, lo + base + (self.rank < extra))

    # ---------------------------------------------------------------- collectives
    def allreduce_sum(self, buf, kind="allreduce"):
        """Sum the contiguous array ``buf`` over the ranks, in place (``MPI.IN_PLACE``)."""
        self._usable()
        self._wait(self._comm.Iallreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM), kind)

    def sum(self, value):
        """The float ``value`` summed over the ranks."""
        buf = np.array([value], np.float64)
        self.allreduce_sum(buf, "reduce")
        return float(buf[0])

    def broadcast(self, array):
        """Rank 0's values of ``array`` into ``array`` on every rank, in place."""
        self._usable()
        buf = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        self._wait(self._comm.Ibcast(buf, root=0), "broadcast")
        if buf is not array:
            array[...] = buf

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (pickled) on every rank; other ranks' ``obj`` is ignored."""
        data = bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)) if self.is_root \
            else None
        n = np.array([0 if data is None else len(data)], np.int64)
        self.broadcast(n)
        buf = np.frombuffer(data, np.uint8) if data is not None else np.empty(int(n[0]), np.uint8)
        self.broadcast(buf)
        return obj if self.is_root else pickle.loads(buf.tobytes())

    def from_root(self, fn):
        """``fn()`` run on rank 0, its result (or its exception, raised) on every rank: e.g.
        a checkpoint read where only rank 0 may see the file."""
        payload = None
        if self.is_root:
            try:
                payload = (True, fn())
                pickle.dumps(payload)    # what cannot travel fails here, on rank 0 alone
            except Exception as exc:
                try:
                    payload = (False, exc)
                    pickle.dumps(payload)
                except Exception:
                    payload = (False, RuntimeError(f"{type(exc).__name__}: {exc}"))
        ok, value = self.broadcast_object(payload)
        if not ok:
            raise value
        return value

    def gather_rows(self, local, B):
        """[..., B, H] on every rank from each rank's rows [..., B_r, H] of it (axis -2): a sum
        of zeros but for each rank's rows, so the values arrive exactly."""
        full = np.zeros(local.shape[:-2] + (B,) + local.shape[-1:], local.dtype)
        full[..., self.rows(B), :] = local
        self.allreduce_sum(full, "reduce")
        return full

    # ---------------------------------------------------------------- failures
    @contextlib.contextmanager
    def failing_together(self):
        """Tell the other ranks when the block raises here (not for a :class:`DistributedError`,
        which says another rank failed already)."""
        try:
            yield
        except DistributedError:
            raise
        except BaseException as exc:
            self.fail(exc)
            raise

    def fail(self, exc):
        """Tell every other rank that this one failed with ``exc``; the group is unusable from
        here on. Sent once; never blocks."""
        self._notify("failed", f"{type(exc).__name__}: {exc}")

    def _notify(self, event, text):
        """Send (event, text) to every other rank, once per group ("exited": at exit, unless the
        group failed already)."""
        if self.broken is not None or self._MPI.Is_finalized():
            return
        self.broken = f"rank {self.rank} {event}" + (f" ({text})" if text else "")
        for peer in range(self.size):
            if peer != self.rank:
                self._sent.append(self._notices.isend((event, text), dest=peer,
                                                      tag=_NOTICE_TAG))
        deadline = time.monotonic() + 1.0    # small messages leave at once; don't hang here
        while self._sent and time.monotonic() < deadline:
            self._sent = [r for r in self._sent if not r.Test()]

    def _usable(self):
        if self.broken is not None:
            raise DistributedError(f"rank {self.rank}: data-parallel training stopped earlier: "
                                   f"{self.broken}")

    def _wait(self, request, kind):
        t0 = time.perf_counter()
        if not request.Test():
            deadline = time.monotonic() + self.timeout
            spin_until = time.monotonic() + _SPIN_S
            status = self._MPI.Status()
            while not request.Test():
                if self._notices.Iprobe(source=self._MPI.ANY_SOURCE, tag=_NOTICE_TAG,
                                        status=status):
                    raise self._peer_left(status.Get_source(), kind)
                now = time.monotonic()
                if now > deadline:
                    self.broken = f"no answer from the other ranks for {self.timeout:g} s"
                    atexit.register(self._abort_job)
                    raise DistributedError(
                        f"rank {self.rank}: no answer from the other ranks for "
                        f"{self.timeout:g} s in {_WHAT[kind]}: a rank hangs or died; the job is "
                        f"aborted when this process exits (timeout: "
                        f"rnnkern.distributed.MPIGroup(timeout=...) or RNNKERN_MPI_TIMEOUT)")
                if now < spin_until:
                    os.sched_yield()    # a peer computing: give a thread sharing this core its turn
                else:
                    time.sleep(_NAP_S)
        spent = self.timings[kind]
        spent[0] += time.perf_counter() - t0
        spent[1] += 1

    def _peer_left(self, peer, kind):
        """The DistributedError for the notice ``peer`` sent (the group is broken from here)."""
        event, text = self._notices.recv(source=peer, tag=_NOTICE_TAG)
        self.broken = f"rank {peer} {event}" + (f" ({text})" if text else "")
        if event == "failed":
            return DistributedError(f"rank {self.rank}: rank {peer} of {self.size} failed with "
                                    f"{text}; stopping here too")
        return DistributedError(f"rank {self.rank}: rank {peer} of {self.size} ended its program "
                                f"while this rank waits in {_WHAT[kind]}: every rank must make "
                                f"the same calls (fit, evaluate, save, load) in the same order")

    def _abort_job(self):
        """At exit after a timeout (this rank's traceback printed): end every rank, the one
        that hangs included. This process ends by a signal, which the launcher (mpiexec's
        process manager) answers by killing every rank: MPI_Abort's request to the launcher
        was seen to lose a race with the process's exit on a loaded machine, and a rank that
        merely exits leaves the others running."""
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# -------------------------------------------------------------------- shares of a batch
def loss_fraction(loss, y, weights, rows, B):
    """The share of the loss's normaliser that rows ``rows`` of a batch of ``B`` rows hold, f:
    the loss (and gradient) of those rows, normalised on their own and times f, summed over
    the shares gives the whole batch's. ``sequence_loss``: their weight total over the batch's
    (TF's 1e-12 added to both); ``sum_squares`` (a sum): 1; ``mse`` and any other loss, taken
    to be a mean over rows: their count over B."""
    n = len(range(B)[rows])
    if loss is sequence_loss:
        if weights is None:
            T = np.shape(y)[1]
            return (n * T + _EPS) / (B * T + _EPS)
        w = np.asarray(weights, np.float64)
        return (float(w[rows].sum()) + _EPS) / (float(w.sum()) + _EPS)
    if loss is sum_squares:
        return 1.0
    return n / B


@dataclass
class Shard:
    """This rank's rows of a batch (``x``, ``y``, ``lengths``, ``weights``) and ``fraction``, its
    share of the loss's normaliser (:func:`loss_fraction`)."""

    x: object
    y: object
    lengths: object
    weights: object
    fraction: float


def shard_batch(group, loss, x, y, lengths=None, weights=None):
    """This rank's :class:`Shard` of the batch ``(x, y, lengths, weights)``; ValueError (the same
    on every rank) when the batch has fewer rows than there are ranks."""
    B = len(x)
    rows = group.rows(B)

    def take(a):
        return None if a is None else a[rows]
    return Shard(take(x), take(y), take(lengths), take(weights),
                 loss_fraction(loss, y, weights, rows, B))


def split_streams(model, rank):
    """Rank ``rank``'s dropout generators: the model's, jumped ``rank`` times (rank 0 keeps its
    own), so that the ranks draw independent masks for their rows."""
    get, put = getattr(model, "get_rng_state", None), getattr(model, "set_rng_state", None)
    if get is None or put is None or rank == 0:
        return
    states = {}
    for key, st in get().items():
        bits = getattr(np.random, st["bit_generator"])()
        bits.state = st
        states[key] = bits.jumped(rank).state
    put(states)
