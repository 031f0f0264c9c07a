"""Tensor-parallel linear layers: drop-in ``ColumnParallelLinear`` and ``RowParallelLinear``.

Constructor arguments follow vLLM's and Megatron-LM's layers of the same names.  With ``tp`` ranks in
the group and ``Y = X @ W.T + b`` the unsharded linear (``W``: ``[output_size, input_size]``):

* **Column parallel** splits ``W`` by output features: rank ``r`` holds rows
  ``r*output_size/tp .. (r+1)*output_size/tp - 1`` of ``W`` (and the same slice of ``b``) and computes
  its slice of ``Y`` from the full ``X``.  ``gather_output=True`` all-gathers the slices into the full
  ``Y`` on every rank; otherwise the output stays sharded (the usual input of a row-parallel layer).
* **Row parallel** splits ``W`` by input features: rank ``r`` holds columns
  ``r*input_size/tp .. (r+1)*input_size/tp - 1`` and multiplies them with its slice of ``X``
  (``input_is_parallel=True``: the caller passes the slice; ``False``: the layer takes it from the full
  ``X``).  The partial products are summed by an all-reduce; the bias is added once, after the reduce.

Communication goes through the torch custom ops of :mod:`sagellm_comm.ops` (``torch.ops.sagellm_comm.*``),
so a model built from these layers compiles with ``torch.compile(fullgraph=True)`` and captures in a
CUDA graph; the group's backend decides what runs (custom kernels, NCCL, Gloo).  A group of one rank
does no communication.  Forward-only (inference): the ops have no autograd formula.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from sagellm_comm import ops
from sagellm_comm.arguments import check_device, check_flag, check_is_tensor, is_int
from sagellm_comm.errors import GroupInvalidError, InvalidArgumentError, ShapeMismatchError
from sagellm_comm.group import current_default_group, resolve_group

if TYPE_CHECKING:
    from sagellm_comm.group import CommGroup

__all__ = ["PARAMS_DTYPES", "ColumnParallelLinear", "RowParallelLinear", "divide"]

#: the parameter dtypes a layer takes (``params_dtype``): the floating-point types its initialisation handles
PARAMS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """``numerator // denominator`` as a Python int, raising :class:`InvalidArgumentError` unless ``numerator`` is a
    positive integer (Python's or NumPy's, not a bool) that it divides exactly."""
    if not is_int(numerator) or numerator < 1:
        raise InvalidArgumentError(f"{what} must be a positive int, got {numerator!r}")
    numerator = int(numerator)
    if numerator % denominator:
        raise InvalidArgumentError(
            f"{what}={numerator} is not divisible by the tensor-parallel size {denominator}; "
            f"pick a size that is a multiple of {denominator} or a smaller group",
            details={what: numerator, "tp_size": denominator},
        )
    return numerator // denominator


class _ParallelLinearBase(nn.Module):
    """Shared set-up: the group, the parameters and the return convention."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool,
        skip_bias_add: bool,
        params_dtype: torch.dtype | None,
        group: CommGroup | str | None,
        device: torch.device | str | None,
        return_bias: bool,
    ):
        super().__init__()
        # Resolved and checked here; its name is registered last (_register_group), once nothing can fail.
        comm_group = resolve_group(group, member=True)
        self.tp_size = comm_group.world_size
        self.tp_rank = comm_group.rank
        self._built_on = weakref.ref(comm_group)  # _check_group: the group the shards were cut for
        self.input_size = divide(input_size, 1, "input_size")
        self.output_size = divide(output_size, 1, "output_size")
        self.skip_bias_add = check_flag(skip_bias_add, "skip_bias_add")
        self.return_bias = check_flag(return_bias, "return_bias")
        self.params_dtype = params_dtype if params_dtype is not None else torch.get_default_dtype()
        if self.params_dtype not in PARAMS_DTYPES:
            raise InvalidArgumentError(
                f"params_dtype must be one of {[str(d) for d in PARAMS_DTYPES]} (a torch.dtype), got {params_dtype!r}"
            )
        self.device = _usable(check_device(device)) if device is not None else comm_group.device
        self._has_bias = check_flag(bias, "bias")

    def _make_params(self, weight_shape: tuple[int, int], bias_size: int) -> None:
        kw = {"dtype": self.params_dtype, "device": self.device}
        self.weight = nn.Parameter(torch.empty(weight_shape, **kw), requires_grad=False)
        if self._has_bias:
            self.bias = nn.Parameter(torch.zeros(bias_size, **kw), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def _register_group(self, group: CommGroup | str | None) -> None:
        """Set ``group_name``, registering a :class:`CommGroup` under a generated name if it has none.  The last
        step of a constructor, once everything else was checked and built: a construction that raises leaves
        nothing registered."""
        self.group_name = ops.group_name(group)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation of the local shard (use :meth:`load_weight` for real weights)."""
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _result(self, output: torch.Tensor, output_bias: torch.Tensor | None):
        if self.skip_bias_add or self.return_bias:
            return output, output_bias
        return output

    def _check_input(self, x: torch.Tensor, features: int) -> None:
        check_is_tensor(x, "input")
        if x.dim() < 1 or x.shape[-1] != features:
            raise ShapeMismatchError(
                f"{type(self).__name__} expects input [..., {features}], got {tuple(x.shape)}",
                details={"shape": tuple(x.shape), "expected_last_dim": features},
            )

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, self.weight, bias)``; an input on another device than the parameters, or of another dtype
        outside ``torch.autocast``, raises ``InvalidArgumentError``.  Diagnosed only once torch refused the
        operands, so the checks cost nothing on a call that works."""
        try:
            return F.linear(x, self.weight, bias)
        except (RuntimeError, NotImplementedError) as exc:
            refusal = self._operand_refusal(x)
            if refusal is not None:
                raise refusal from exc
            raise

    def _operand_refusal(self, x: torch.Tensor) -> InvalidArgumentError | None:
        """The error for an input on another device than the parameters or of another dtype, else None."""
        weight = self.weight
        if x.device != weight.device:
            return InvalidArgumentError(
                f"{type(self).__name__} input is on {x.device}, its parameters on {weight.device}; move it there"
            )
        if x.dtype != weight.dtype:
            return InvalidArgumentError(
                f"{type(self).__name__} input is {x.dtype}, its parameters {weight.dtype} (params_dtype); cast "
                "it or run under torch.autocast"
            )
        return None

    @staticmethod
    def _check_loaded(loaded: object, what: str) -> None:
        check_is_tensor(loaded, what)
        if loaded.layout != torch.strided:
            raise InvalidArgumentError(f"{what} must be a dense tensor, got layout {loaded.layout} (call .to_dense())")
        if loaded.is_meta:
            raise InvalidArgumentError(f"{what} is on the meta device and holds no values; load a materialised tensor")
        if loaded.dim() == 0:
            raise ShapeMismatchError(f"{what} must have at least one dimension, got a 0-d tensor")

    def __getstate__(self) -> dict:
        # A pickled or deep-copied layer forgets the group object (a weak reference does not pickle); its first
        # collective resolves the name and checks the group again.
        state = self.__dict__.copy()
        state["_built_on"] = _no_group
        return state

    def _check_group(self) -> None:
        """Before a collective: the group the layer's name resolves to now is the one its shard was cut for.

        A layer on the default group (or on a name registered again) would otherwise, after ``destroy()`` and an
        ``init`` of another size, sum or gather its shard over the new group: a wrong result, no error.  The
        common case is one identity test (the group the name is bound to now is the one the layer was built on);
        another group of the same size and rank is taken as the layer's from then on.  Compiled too: the identity
        test goes through ``id()``, on which Dynamo guards (it does not on ``is``), so a graph traced while the
        name was bound to one group is traced again, and checked, once it is bound to another."""
        name = self.group_name
        bound = current_default_group() if name == ops.DEFAULT_GROUP_NAME else ops.bound_group(name)
        if bound is not None and id(bound) == id(self._built_on()):
            return
        group = resolve_group(name)  # GroupNotFoundError / NotInitializedError when there is none
        if group.world_size != self.tp_size or group.rank != self.tp_rank:
            raise GroupInvalidError(
                f"{type(self).__name__} was built for rank {self.tp_rank} of {self.tp_size} in group "
                f"{name!r}, which is now rank {group.rank} of {group.world_size}; build the layer again "
                "on the new group",
                details={"group": name, "tp_size": self.tp_size, "tp_rank": self.tp_rank,
                         "group_size": group.world_size, "group_rank": group.rank},
            )  # fmt: skip
        if not torch.compiler.is_compiling():  # a traced call keeps its guards on the groups it saw instead
            self._built_on = weakref.ref(group)

    @staticmethod
    def _checked_shard(param: torch.Tensor, shard: torch.Tensor, what: str) -> torch.Tensor:
        if tuple(shard.shape) != tuple(param.shape):
            raise ShapeMismatchError(
                f"{what} shard is {tuple(shard.shape)}, the layer holds {tuple(param.shape)}",
                details={"shard": tuple(shard.shape), "param": tuple(param.shape)},
            )
        return shard

    @staticmethod
    def _converted(param: torch.Tensor, shard: torch.Tensor, what: str) -> torch.Tensor:
        """``shard`` in ``param``'s dtype and on its device, ready to copy; a shard torch cannot convert (a quantized
        tensor, say) raises ``InvalidArgumentError`` here, before any parameter is written."""
        try:
            return shard.to(dtype=param.dtype, device=param.device)
        except (RuntimeError, NotImplementedError) as exc:
            raise InvalidArgumentError(
                f"{what} ({shard.dtype} on {shard.device}) cannot be converted to the layer's {param.dtype} on "
                f"{param.device}: {exc}"
            ) from exc

    @staticmethod
    def _copy_shards(shards: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy every converted shard into its parameter (nothing left to fail: same shape, dtype and device)."""
        with torch.no_grad():
            for param, shard in shards:
                param.copy_(shard)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        """vLLM-style loader: copy this rank's part of the full ``loaded_weight`` (``[output_size, input_size]``,
        or the bias ``[output_size]``) into ``param`` (column-parallel: its rows, the output features, of both;
        row-parallel: its columns, the input features, of the weight, and the bias whole).  ``param`` must be
        this layer's weight or bias."""
        if param is not self.weight and (self.bias is None or param is not self.bias):
            raise InvalidArgumentError(
                f"weight_loader: the parameter given (shape {tuple(getattr(param, 'shape', ()))}) is not a parameter "
                f"of this {type(self).__name__}: pass its weight or bias"
            )
        what = "weight" if param is self.weight else "bias"
        self._copy_shards([(param, self._converted(param, self._shard(param, loaded_weight), f"loaded {what}"))])

    def load_weight(self, full_weight: torch.Tensor, full_bias: torch.Tensor | None = None) -> None:
        """Load an unsharded ``nn.Linear``'s ``weight`` (``[output_size, input_size]``) and ``bias``
        (``[output_size]``) into this rank's parameters as :meth:`weight_loader` does (column-parallel:
        both sharded by output rows; row-parallel: weight sharded by input columns, bias whole).  Both are checked
        before either is copied: on an error the layer keeps the parameters it had."""
        self._check_loaded(full_weight, "full weight")
        if full_bias is not None:
            self._check_loaded(full_bias, "full bias")
        if tuple(full_weight.shape) != (self.output_size, self.input_size):
            raise ShapeMismatchError(
                f"full weight must be [{self.output_size}, {self.input_size}], got {tuple(full_weight.shape)}"
            )
        shards = [(self.weight, self._converted(self.weight, self._shard(self.weight, full_weight), "full weight"))]
        if full_bias is not None:
            if self.bias is None:
                raise InvalidArgumentError("a bias was given, but the layer was built with bias=False")
            shards.append((self.bias, self._converted(self.bias, self._shard(self.bias, full_bias), "full bias")))
        self._copy_shards(shards)  # only once both were checked and converted

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group: CommGroup | str | None = None, **kwargs):
        """This rank's shard of ``linear`` (same dtype; ``kwargs`` go to the constructor, except what ``linear``
        decides: its sizes and whether it has a bias)."""
        if not isinstance(linear, nn.Linear):
            raise InvalidArgumentError(f"from_linear takes a torch.nn.Linear, got {type(linear).__name__}")
        decided = sorted(set(kwargs) & {"input_size", "output_size", "bias"})
        if decided:
            raise InvalidArgumentError(
                f"from_linear: {decided} come from the nn.Linear given and cannot be passed too",
                details={"options": decided},
            )
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            params_dtype=kwargs.pop("params_dtype", linear.weight.dtype),
            group=group,
            **kwargs,
        )
        layer.load_weight(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())
        return layer

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, output_size={self.output_size}, bias={self.bias is not None}, "
            f"tp_size={self.tp_size}, tp_rank={self.tp_rank}, group={self.group_name!r}"
        )


class ColumnParallelLinear(_ParallelLinearBase):
    """``Y = X @ W.T + b`` with ``W`` (``[output_size, input_size]``) split by rows over the group.

    Args:
        input_size: features of ``X`` (the full size; every rank gets the whole ``X``).
        output_size: features of ``Y``; must divide by the group size.
        bias: hold this rank's slice of a bias (``[output_size / tp]``).
        gather_output: all-gather the slices so every rank returns the full ``[..., output_size]``;
            False returns this rank's ``[..., output_size / tp]``.
        skip_bias_add: do not add the bias; return ``(output, bias_slice)`` for the caller to fuse.
        params_dtype: dtype of the parameters (default: ``torch.get_default_dtype()``).
        group: a :class:`CommGroup`, a name registered with :func:`sagellm_comm.ops.register_group`,
            or None for the default group.
        device: where the parameters live (default: the group's device).
        return_bias: return ``(output, output_bias)`` like vLLM's layers (``output_bias`` is None
            unless ``skip_bias_add``).

    Forward: ``x`` ``[..., input_size]`` of ``params_dtype`` on the layer's device ->
    ``[..., output_size]`` (gathered) or ``[..., output_size / tp]``; enqueued on the current stream.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = False,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        *,
        group: CommGroup | str | None = None,
        device: torch.device | str | None = None,
        return_bias: bool = False,
    ):
        super().__init__(
            input_size,
            output_size,
            bias=bias,
            skip_bias_add=skip_bias_add,
            params_dtype=params_dtype,
            group=group,
            device=device,
            return_bias=return_bias,
        )
        self.output_size_per_partition = divide(output_size, self.tp_size, "output_size")
        self.gather_output = check_flag(gather_output, "gather_output")
        self._make_params((self.output_size_per_partition, self.input_size), self.output_size_per_partition)
        self._register_group(group)

    def _shard(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> torch.Tensor:
        """This rank's rows (output features) of the full ``loaded_weight`` (``[output_size, input_size]``, or
        the bias ``[output_size]``), checked against ``param``."""
        self._check_loaded(loaded_weight, "loaded weight")
        if loaded_weight.shape[0] != self.output_size:
            raise ShapeMismatchError(
                f"full tensor has {loaded_weight.shape[0]} output features, the layer {self.output_size}",
                details={"shape": tuple(loaded_weight.shape), "output_size": self.output_size},
            )
        shard = loaded_weight.narrow(0, self.tp_rank * self.output_size_per_partition, self.output_size_per_partition)
        return self._checked_shard(param, shard, "weight" if param is self.weight else "bias")

    def forward(self, x: torch.Tensor):
        self._check_input(x, self.input_size)
        bias = None if self.skip_bias_add else self.bias
        output = self._linear(x, bias)
        if self.gather_output and self.tp_size > 1:
            self._check_group()
            lead = output.shape[:-1]
            local = output.reshape(-1, self.output_size_per_partition)
            gathered = torch.ops.sagellm_comm.all_gather(local, self.group_name, self.tp_size)
            # [tp * rows, n_local] rank-major -> [rows, tp * n_local]: rank r's slice at columns r*n_local
            gathered = gathered.view(self.tp_size, -1, self.output_size_per_partition).transpose(0, 1)
            output = gathered.reshape(*lead, self.output_size)
        return self._result(output, self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gather_output={self.gather_output}"


class RowParallelLinear(_ParallelLinearBase):
    """``Y = X @ W.T + b`` with ``W`` (``[output_size, input_size]``) split by columns over the group.

    Args:
        input_size: features of the full ``X``; must divide by the group size.
        output_size: features of ``Y`` (full on every rank after the all-reduce).
        bias: hold the full bias ``[output_size]``; it is added once, after the all-reduce.
        input_is_parallel: the caller passes this rank's slice ``[..., input_size / tp]`` (the output
            of a ``ColumnParallelLinear(gather_output=False)``); False: pass the full ``X`` and the
            layer takes the slice.
        skip_bias_add: do not add the bias; return ``(output, bias)``.
        params_dtype, group, device, return_bias: as for :class:`ColumnParallelLinear`.
        reduce_results: all-reduce the partial products (default).  False returns this rank's partial
            sum (the caller reduces, e.g. in a fused all-reduce + RMSNorm); then a bias must be
            returned with ``skip_bias_add=True``, since adding it on every rank would count it ``tp``
            times.
        use_fused_gemm: run the matmul and the all-reduce as one ``sagellm_comm.fused.gemm_all_reduce``
            call (tile-level overlap) instead of ``F.linear`` then the all-reduce op.  Eager only
            (not traced by ``torch.compile``); needs ``sagellm_comm.fused``.  Under ``torch.autocast`` (and for
            zero tokens) the layer runs ``F.linear`` then the all-reduce op, as without it.

    Forward: ``x`` ``[..., input_size / tp]`` (or ``[..., input_size]``) of ``params_dtype`` ->
    ``[..., output_size]``, identical on every rank; enqueued on the current stream.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = True,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype | None = None,
        reduce_results: bool = True,
        *,
        group: CommGroup | str | None = None,
        device: torch.device | str | None = None,
        return_bias: bool = False,
        use_fused_gemm: bool = False,
    ):
        super().__init__(
            input_size,
            output_size,
            bias=bias,
            skip_bias_add=skip_bias_add,
            params_dtype=params_dtype,
            group=group,
            device=device,
            return_bias=return_bias,
        )
        self.input_size_per_partition = divide(input_size, self.tp_size, "input_size")
        self.input_is_parallel = check_flag(input_is_parallel, "input_is_parallel")
        self.reduce_results = check_flag(reduce_results, "reduce_results")
        if not self.reduce_results and bias and not self.skip_bias_add:
            raise InvalidArgumentError(
                "reduce_results=False with a bias needs skip_bias_add=True (the caller adds the bias once, "
                "after its own reduction)"
            )
        self.use_fused_gemm = check_flag(use_fused_gemm, "use_fused_gemm")
        if self.use_fused_gemm:
            _fused_gemm_all_reduce()  # fail at construction, not in the first forward
        self._make_params((self.output_size, self.input_size_per_partition), self.output_size)
        self._register_group(group)

    def _shard(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> torch.Tensor:
        """The weight ``[output_size, input_size]`` gives this rank's columns; the bias ``[output_size]`` is taken
        whole; checked against ``param``."""
        self._check_loaded(loaded_weight, "loaded weight")
        if param is self.bias:
            return self._checked_shard(param, loaded_weight, "bias")
        if loaded_weight.dim() != 2 or loaded_weight.shape[1] != self.input_size:
            raise ShapeMismatchError(
                f"full weight must be [{self.output_size}, {self.input_size}], got {tuple(loaded_weight.shape)}"
            )
        start = self.tp_rank * self.input_size_per_partition
        return self._checked_shard(param, loaded_weight.narrow(1, start, self.input_size_per_partition), "weight")

    def forward(self, x: torch.Tensor):
        if self.input_is_parallel:
            self._check_input(x, self.input_size_per_partition)
            x_local = x
        else:
            self._check_input(x, self.input_size)
            x_local = x.narrow(-1, self.tp_rank * self.input_size_per_partition, self.input_size_per_partition)
        if self.reduce_results and self.tp_size > 1:
            self._check_group()
        # Zero tokens: the op's path (an empty all-reduce), as with use_fused_gemm=False; the fused GEMM refuses M = 0.
        # Under torch.autocast too: autocast casts F.linear's operands, the fused GEMM takes one dtype as given.
        fused = self.use_fused_gemm and self.reduce_results and self.tp_size > 1 and x_local.numel() > 0
        if fused and not torch.is_autocast_enabled(x_local.device.type):
            refusal = self._operand_refusal(x_local)  # the plain layer's error, before any rank enters the GEMM
            if refusal is not None:
                raise refusal
            lead = x_local.shape[:-1]
            a = x_local.reshape(-1, self.input_size_per_partition).contiguous()
            output = _fused_gemm_all_reduce()(a, self.weight.t(), group=resolve_group(self.group_name))
            output = output.reshape(*lead, self.output_size)
        else:
            output = self._linear(x_local)
            if self.reduce_results and self.tp_size > 1:
                output = torch.ops.sagellm_comm.all_reduce(output, self.group_name, "sum")
        if self.bias is not None and not self.skip_bias_add:
            # once, on the reduced sum; in the output's dtype (under torch.autocast F.linear's, as nn.Linear's bias)
            output = output + self.bias.to(output.dtype)
        return self._result(output, self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", input_is_parallel={self.input_is_parallel}"


def _usable(device: torch.device) -> torch.device:
    """``device`` if this process can make tensors there; ``InvalidArgumentError`` otherwise (a device type torch
    was built without, no such accelerator, an index past the last one), not torch's AssertionError, ImportError
    or RuntimeError from the first parameter made.  One empty tensor: no memory is asked for."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ImportError) as exc:
        raise InvalidArgumentError(
            f"device {str(device)!r} cannot hold the layer's parameters in this process ({exc}); pass a device "
            "this process has, or None for the group's device",
            details={"device": str(device)},
        ) from exc
    return device


def _no_group() -> None:
    """The ``_built_on`` of a layer that holds no group object (unpickled or deep-copied)."""
    return None


def _fused_gemm_all_reduce():
    """``sagellm_comm.fused.gemm_all_reduce``, or a typed error when that module is not available."""
    try:
        from sagellm_comm.fused import gemm_all_reduce
    except ImportError as exc:
        from sagellm_comm.errors import BackendNotSupportedError

        raise BackendNotSupportedError(
            f"use_fused_gemm=True needs sagellm_comm.fused.gemm_all_reduce, which cannot be imported ({exc}); "
            "use the default use_fused_gemm=False"
        ) from exc
    return gemm_all_reduce
