"""The DeepSeek-V3/R1 causal LM: composes MLA, MoE and dense layers; owns no scheduling."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .attention import AttentionPath, MLAttention
from .batch import ForwardBatch
from .config import ModelConfig
from .fp8 import Fp8Weight, kept_fp8, resolve_weight_format
from .fp8_linear import Fp8Linear
from .kernels import KernelPath
from .layers import MLP, RMSNorm, linear
from .moe import ExpertLayout, LocalExperts, MoE, RoutedExperts
from .rope import RotaryEmbedding
from .weights import checkpoint_shapes, expert_of, layer_of


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype, device, experts: ExpertLayout):
        super().__init__()
        self.self_attn = MLAttention(config, dtype, device)
        if config.is_moe_layer(layer):
            self.mlp = MoE(config, dtype, device, experts.expert_ids(layer), experts.dispatcher(layer))
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, dtype, device)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)

    def forward(self, x, batch, cache, rope, cos_sin, path: AttentionPath) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, cache, rope, cos_sin, path)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, dtype, device, experts: ExpertLayout):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.requires_grad_(False)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype, device, experts) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)


class DeepseekV3ForCausalLM(nn.Module):
    """Parameter names equal the published checkpoint's, except routed experts, which are stacked
    per layer (`mlp.experts.w13` / `w2`) so each expert's tokens run as one matmul.

    `experts` says which routed experts each MoE layer holds here and how tokens reach them (expert
    parallelism); by default this process holds them all.

    `weights`: dequantized (every weight in `dtype`) or fp8: the projections an FP8 checkpoint stores as e4m3
    (attention's, the dense and shared MLPs' as `Fp8Linear` layers, the routed experts' in FP8
    `RoutedExperts`) stay so; MLA's `kv_b_proj`, which the
    absorbed decode path splits per head, stays dequantized (it is small), as do embeddings, lm_head, norms
    and the router. Only the dequantized format is token-exact with the reference model.
    """

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        experts: ExpertLayout | None = None,
        weights: str = "dequantized",
    ):
        super().__init__()
        if weights not in ("fp8", "dequantized"):
            raise ValueError(f"weights: must be fp8 or dequantized here (got {weights!r}); resolve auto first")
        self.config, self.dtype, self.weight_format = config, dtype, weights
        self.expert_layout = experts or LocalExperts(config.n_routed_experts)
        self.model = Backbone(config, dtype, device, self.expert_layout)
        self.rotary = RotaryEmbedding(config).to(device)
        self._kernels: KernelPath = "torch"
        if not config.tie_word_embeddings:
            self.lm_head = linear(config.hidden_size, config.vocab_size, dtype, device)
        if weights == "fp8":
            self._keep_projections_fp8(device)

    def _keep_projections_fp8(self, device) -> None:
        for name, module in list(self.named_modules()):
            if isinstance(module, nn.Linear) and kept_fp8(f"{name}.weight"):
                parent, _, attribute = name.rpartition(".")
                setattr(self.get_submodule(parent), attribute, Fp8Linear(
                    module.in_features, module.out_features, self.dtype, device, bias=module.bias is not None))
        for moe in self.moe_layers():
            moe.experts = RoutedExperts(self.config, moe.experts.expert_ids, self.dtype, device, fp8=True)

    def _keep_fp8(self):
        """Which checkpoint tensors loading keeps as stored (None: every one dequantized)."""
        return kept_fp8 if self.weight_format == "fp8" else None

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def kernels(self) -> KernelPath:
        return self._kernels

    def set_kernels(self, path: KernelPath) -> None:
        """Run attention decodes and routed experts on the torch path or the Triton kernels."""
        if path not in ("torch", "triton"):
            raise ValueError(f"kernels: must be torch or triton here (got {path!r}); resolve auto first")
        self._kernels = path
        for module in self.modules():
            if isinstance(module, (MLAttention, RoutedExperts, Fp8Linear)):
                module.kernels = path

    def allocate_kv_cache(self, num_slots: int, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """One [num_slots, kv_lora_rank + qk_rope_head_dim] latent cache per layer."""
        shape = (num_slots, self.config.latent_dim)
        return [torch.zeros(shape, dtype=dtype or self.dtype, device=self.device) for _ in self.model.layers]

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor], path: AttentionPath = "auto") -> torch.Tensor:
        """One step over packed tokens -> logits [len(batch.logits_indices), vocab] for the wanted rows."""
        x = self._layers(batch, kv_caches, path)
        return self.head(self.model.norm(x[batch.logits_indices]))

    @torch.inference_mode()
    def hidden_states(self, batch: ForwardBatch, kv_caches: list[torch.Tensor], path: AttentionPath = "auto"
                      ) -> torch.Tensor:
        """One step over packed tokens -> the final-normed hidden state of every token [T, hidden]: what `head`
        turns into logits, and what the MTP module drafts from."""
        return self.model.norm(self._layers(batch, kv_caches, path))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.head_weight())

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def _layers(self, batch: ForwardBatch, kv_caches: list[torch.Tensor], path: AttentionPath) -> torch.Tensor:
        x = self.model.embed_tokens(batch.input_ids)
        cos_sin = self.rotary.cos_sin(batch.positions, self.dtype)
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, batch, cache, self.rotary, cos_sin, path)
        return x

    # -- weights ---------------------------------------------------------------------------------

    def expected_checkpoint_shapes(self) -> dict[str, tuple[int, ...]]:
        """The checkpoint tensors this instance needs: all but the routed experts it does not hold."""
        shapes = checkpoint_shapes(self.config)
        return {name: shape for name, shape in shapes.items() if self._holds(name)}

    def _holds(self, name: str) -> bool:
        hit = expert_of(name)
        if hit is None:
            return True
        layer, expert, _ = hit
        return expert in self.model.layers[layer].mlp.experts.expert_ids

    def load_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor into its place (a stacked expert slot or a named parameter)."""
        hit = expert_of(name)
        if hit is None and isinstance(tensor, Fp8Weight):  # kept as stored, with its multipliers
            self.get_parameter(name).copy_(tensor.weight)
            self.get_parameter(name.removesuffix("weight") + "weight_scale_inv").copy_(tensor.scale_inv)
            return
        if hit is None:
            target = self.get_parameter(name) if not name.endswith("e_score_correction_bias") else self.get_buffer(name)
            if target.dtype == torch.float8_e4m3fn:
                raise ValueError(f"weights: fp8 needs {name} stored as FP8 in the checkpoint (it is {tensor.dtype})")
            target.copy_(tensor)
            return
        layer, expert, proj = hit
        experts = self.model.layers[layer].mlp.experts
        _copy_expert(experts.tensors(), experts.expert_ids, expert, proj, tensor)

    def checkpoint_tensors(self) -> Iterable[tuple[str, torch.Tensor]]:
        """This instance's weights under their published names (the inverse of load_tensor)."""
        if self.weight_format != "dequantized":
            raise ValueError("checkpoint_tensors: only a model with dequantized weights holds them as tensors")
        for name in self.expected_checkpoint_shapes():
            hit = expert_of(name)
            if hit is None:
                owner = self.get_buffer if name.endswith("e_score_correction_bias") else self.get_parameter
                yield name, owner(name)
                continue
            layer, expert, proj = hit
            yield name, expert_projection(self.model.layers[layer].mlp.experts, expert, proj)

    def moe_layers(self, mtp: bool = False) -> list[MoE]:
        """The decoder's MoE layers, and with `mtp` the MTP module's where one is loaded."""
        layers = [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]
        return layers + ([self.mtp.block.mlp] if mtp and getattr(self, "mtp", None) is not None else [])

    def routed_experts(self, layer: int) -> RoutedExperts:
        """The routed experts of MoE layer `layer`: a decoder layer's, or the MTP module's (layer
        `num_hidden_layers`), which expert parallelism places like any other."""
        if layer == self.config.num_hidden_layers and getattr(self, "mtp", None) is not None:
            return self.mtp.block.mlp.experts
        return self.model.layers[layer].mlp.experts

    def replace_experts(self, layer: int, expert_ids: Sequence[int]) -> RoutedExperts:
        """Give a MoE layer other experts in its slots (in place); fill them with load_tensor."""
        experts = self.routed_experts(layer)
        experts.reassign(expert_ids)
        return experts

    def stage_experts(self, checkpoint_dir: str | Path, layer_experts: dict[int, Sequence[int]]
                      ) -> dict[int, tuple[torch.Tensor, ...]]:
        """Read the weights MoE layers would hold with other experts in their slots (`layer_experts`), into
        host tensors shaped like the layers' own (`RoutedExperts.tensors()`: FP8 experts with their
        multipliers), without touching the model (so it can keep running)."""
        staged = {}
        for layer, expert_ids in layer_experts.items():
            experts = self.routed_experts(layer)
            staged[layer] = experts.empty_slots(experts.num_slots, device="cpu")
        wanted = {(layer, expert) for layer, expert_ids in layer_experts.items() for expert in expert_ids}
        for layer, expert, proj, tensor in self._read_experts(checkpoint_dir, wanted):
            _copy_expert(staged[layer], layer_experts[layer], expert, proj, tensor)
        return staged

    def _read_experts(self, checkpoint_dir: str | Path, wanted: set[tuple[int, int]]
                      ) -> Iterable[tuple[int, int, str, torch.Tensor]]:
        """(layer, expert, projection, tensor as stored) for each (layer, expert) in `wanted`, from the
        checkpoint (the MTP layer's as the module holds them: dequantized)."""
        from .checkpoint import load_mtp_weights, load_weights

        mtp_layer = self.config.num_hidden_layers
        names = {name for name in checkpoint_shapes(self.config, include_mtp=True)
                 if (hit := expert_of(name)) is not None and hit[:2] in wanted}
        main = {name for name in names if expert_of(name)[0] != mtp_layer}
        if main:
            for name, tensor in load_weights(
                checkpoint_dir, checkpoint_shapes(self.config), self.dtype, include=main.__contains__,
                num_hidden_layers=mtp_layer, progress=False, cast=False, keep_fp8=self._keep_fp8(),
            ):
                yield (*expert_of(name), tensor)
        if names - main:
            for name, tensor in load_mtp_weights(checkpoint_dir, self.dtype, num_hidden_layers=mtp_layer,
                                                 include=(names - main).__contains__, progress=False):
                yield (*expert_of(name), tensor)

    def install_experts(self, layer: int, expert_ids: Sequence[int], *staged: torch.Tensor) -> None:
        """Switch a MoE layer to other experts whose weights were staged (stage_experts): copied in place, so
        CUDA graphs captured over the layer stay valid."""
        experts = self.replace_experts(layer, expert_ids)
        for held, new in zip(experts.tensors(), staged, strict=True):
            held.copy_(new)

    def read_experts(self, checkpoint_dir: str | Path, wanted: set[tuple[int, int]]
                     ) -> dict[tuple[int, int], tuple[torch.Tensor, ...]]:
        """(layer, expert) -> its one-slot `RoutedExperts.tensors()` in host tensors, read from the checkpoint
        without touching the model (so it can keep running): experts staged ahead of `regrow_experts`."""
        staged = {}
        for layer, expert in wanted:
            staged[layer, expert] = self.routed_experts(layer).empty_slots(1, device="cpu")
        for layer, expert, proj, tensor in self._read_experts(checkpoint_dir, wanted):
            _copy_expert(staged[layer, expert], (expert,), expert, proj, tensor)
        return staged

    def regrow_experts(self, checkpoint_dir: str | Path, layer_experts: dict[int, Sequence[int]],
                       staged: dict[tuple[int, int], tuple[torch.Tensor, ...]] | None = None) -> int:
        """Give MoE layers a new list of experts, longer or shorter (a group that lost a rank, or grew back):
        experts a layer already holds are copied from its own slots, those `staged` (read_experts) from there,
        and the others then read from the checkpoint into their slots. One layer's weights are reallocated at a
        time (the memory of one layer more, at most), so CUDA graphs captured over them must be captured again.
        Returns how many experts were read from the checkpoint here."""
        staged = staged or {}
        wanted = set()
        for layer, expert_ids in layer_experts.items():
            experts = self.routed_experts(layer)
            new = experts.empty_slots(len(expert_ids))
            for slot, expert in enumerate(expert_ids):
                if expert in experts.expert_ids:
                    held = experts.expert_ids.index(expert)
                    for target, source in zip(new, experts.tensors()):
                        target[slot].copy_(source[held])
                elif (layer, expert) in staged:
                    for target, source in zip(new, staged[layer, expert]):
                        target[slot].copy_(source[0])
                else:
                    wanted.add((layer, expert))
            experts.resize(expert_ids, *new)  # the old weights go now
        for layer, expert, proj, tensor in self._read_experts(checkpoint_dir, wanted):
            experts = self.routed_experts(layer)
            _copy_expert(experts.tensors(), experts.expert_ids, expert, proj, tensor)
        return len(wanted)

    def load_mtp(self, checkpoint_dir: str | Path) -> None:
        """Read the checkpoint's MTP module (the draft model of speculative decoding) into `self.mtp`; its
        routed experts are those the model's expert layout gives its layer."""
        from .mtp import MultiTokenPredictor

        self.mtp = MultiTokenPredictor.from_checkpoint(checkpoint_dir, self.config, self.dtype, self.device,
                                                       experts=self.expert_layout)
        # DeepSeek-V3 shares the embedding and the output head between the model and its MTP layer, and the
        # published checkpoints store copies of both under the layer. Copies equal to the model's go, and the
        # layer reads the model's own (two vocab x hidden matrices: 3.5 GiB for R1 in bf16).
        if torch.equal(self.mtp.embed_tokens.weight, self.model.embed_tokens.weight):
            self.mtp.embed_tokens.weight = self.model.embed_tokens.weight
        if torch.equal(self.mtp.shared_head.head.weight, self.head_weight()):
            self.mtp.shared_head.head.weight = self.head_weight()
        self.set_kernels(self.kernels)  # the module's attention and experts run on the model's path

    def reset_buffers(self) -> None:
        """Recompute derived, non-checkpoint buffers (after `to_empty` from the meta device)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers()

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        *,
        experts: ExpertLayout | None = None,
        progress: bool = True,
        weights: str = "dequantized",
    ) -> DeepseekV3ForCausalLM:
        """Build the model without initialising weights, then stream the checkpoint in, tensor by tensor.
        `weights`: fp8, dequantized or auto (fp8.resolve_weight_format)."""
        from .checkpoint import is_fp8_checkpoint

        config = ModelConfig.from_file(checkpoint_dir)
        weights = resolve_weight_format(weights, is_fp8_checkpoint(checkpoint_dir), device)
        with torch.device("meta"):
            model = cls(config, dtype, "meta", experts=experts, weights=weights)
        model.to_empty(device=device)
        model.reset_buffers()
        model.load_checkpoint_tensors(checkpoint_dir, progress=progress)
        return model.eval()

    def load_checkpoint_tensors(self, checkpoint_dir: str | Path, names: Iterable[str] | None = None,
                                progress: bool = True) -> None:
        """Read `names` (default: every tensor this instance holds) from the checkpoint into place.

        The whole checkpoint is validated against the full architecture; only the wanted tensors are read.
        """
        from .checkpoint import load_weights

        wanted = set(self.expected_checkpoint_shapes() if names is None else names)
        for name, tensor in load_weights(
            checkpoint_dir, checkpoint_shapes(self.config), self.dtype, include=wanted.__contains__,
            num_hidden_layers=self.config.num_hidden_layers, progress=progress, cast=False,
            keep_fp8=self._keep_fp8(),
        ):
            self.load_tensor(name, tensor)


def expert_projection(experts: RoutedExperts, expert: int, proj: str) -> torch.Tensor:
    """One checkpoint projection of a dequantized expert, as a view of its stacked slot (gate and up share w13)."""
    slot, half = experts.expert_ids.index(expert), experts.intermediate
    if proj == "down_proj":
        return experts.w2[slot]
    return experts.w13[slot, :half] if proj == "gate_proj" else experts.w13[slot, half:]


def _copy_expert(tensors: Sequence[torch.Tensor], expert_ids: Sequence[int], expert: int, proj: str,
                 tensor: torch.Tensor | Fp8Weight) -> None:
    """One checkpoint projection of `expert` into every slot holding it, in per-slot `tensors` laid out as
    `RoutedExperts.tensors()`: gate and up share w13's rows, and with FP8 weights their multipliers' block rows
    (moe_intermediate_size is a multiple of 128 then)."""
    fp8 = isinstance(tensor, Fp8Weight)
    if fp8 != (len(tensors) == 4):
        raise ValueError(f"weights: expert {expert}'s {proj} is stored as {'FP8' if fp8 else tensor.dtype}, but "
                         f"the model holds its experts {'dequantized' if fp8 else 'in FP8'}")
    w13, w2 = tensors[:2]
    half = w13.shape[1] // 2
    for slot, eid in enumerate(expert_ids):
        if eid != expert:
            continue
        if proj == "down_proj":
            w2[slot].copy_(tensor.weight if fp8 else tensor)
            if fp8:
                tensors[3][slot].copy_(tensor.scale_inv)
            continue
        gate = proj == "gate_proj"
        w13[slot, slice(0, half) if gate else slice(half, 2 * half)].copy_(tensor.weight if fp8 else tensor)
        if fp8:
            blocks = tensors[2].shape[1] // 2
            tensors[2][slot, slice(0, blocks) if gate else slice(blocks, 2 * blocks)].copy_(tensor.scale_inv)


__all__ = ["DeepseekV3ForCausalLM", "expert_projection", "layer_of"]
