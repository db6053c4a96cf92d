"""The built-in CPU platform."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import weakref

import torch
import torch.nn.functional as F

from zizhu import ops
from zizhu.host_memory import back_with_huge_pages, keep_freed_memory
from zizhu.platforms import cpu_kernels
from zizhu.platforms.base import Platform

logger = logging.getLogger(__name__)

# Far beyond any cache: the fp32 lm_head of a 129,280-token vocabulary is 132 MB at hidden 256.
LARGE_WEIGHT_BYTES = 64 << 20


class CpuPlatform(Platform):
    name = "cpu"
    device_type = "cpu"
    distributed_backend = "gloo"

    @classmethod
    def is_available(cls) -> bool:
        return True

    def default_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        # fp32: the reference numerics (HF's fp32 logits) and the fastest prompt. dtype="bfloat16"
        # halves the weights and, with the native kernels, decodes faster (BENCHMARKS.md); without
        # them (no compiler or AVX2) torch emulates bf16 matmuls, slower than fp32.
        return torch.float32

    def activation_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        # bf16 weights, fp32 activations (as llama.cpp's CPU backend keeps f32 activations). Without
        # AVX512-BF16 or AMX every bf16 operator computes in fp32 anyway and rounds its output: those
        # roundings bought nothing but error. On the tiny benchmark checkpoint they put the prefill's
        # logits 3.5e-4 nats (mean KL) from the fp32 model's, against 3.6e-5 for llama.cpp's F16
        # file (BENCHMARKS.md); the decode stack already ran in fp32. The KV cache stays bf16.
        return torch.float32 if weight_dtype == torch.bfloat16 else weight_dtype

    def available_memory(self) -> int:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")

    def configure(self) -> None:
        threads = os.environ.get("ZIZHU_NUM_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        if not os.environ.get("ZIZHU_CPU_MALLOC_DEFAULTS"):
            keep_freed_memory()

    def place_weights(self, model: torch.nn.Module) -> None:
        # ZIZHU_CPU_HUGE_PAGES=0 skips this (it costs about 2 s per GB of weights at load)
        if os.environ.get("ZIZHU_CPU_HUGE_PAGES", "1") == "0":
            return
        start = time.perf_counter()
        tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # shared storage once
        moved = back_with_huge_pages(tensors.values())
        logger.info("weights on 2 MB pages: %.2f GB in %.1fs", moved / 1e9, time.perf_counter() - start)

    def int8_linear(self, x: torch.Tensor, qweight, scale: torch.Tensor) -> torch.Tensor:
        # The native kernel wins at every batch size measured (1-64 rows): the reference widens the
        # whole weight to fp32 in memory first, which costs more than the matmul it feeds. It rounds
        # each activation row to int16 (see Platform.int8_linear).
        lib = cpu_kernels.load()
        if isinstance(qweight, cpu_kernels.Int8Panels):  # prepare_linear made it, so lib exists
            return cpu_kernels.int8_linear_panels(lib, x.float(), qweight, scale.float()).to(x.dtype)
        if self._native_int8(lib, x, qweight, scale):
            return cpu_kernels.int8_linear(lib, x, qweight, scale)
        return ops.int8_linear(x, qweight, scale)

    def rms_norm_int8_linear(self, x, norm_weight, eps, qweight, scale) -> torch.Tensor:
        lib = cpu_kernels.load()
        if (
            not isinstance(qweight, cpu_kernels.Int8Panels)
            and self._native_int8(lib, x, qweight, scale)
            and norm_weight.dtype == torch.float32
            and norm_weight.is_contiguous()
        ):
            return cpu_kernels.int8_linear(lib, x, qweight, scale, norm_weight, eps)
        return super().rms_norm_int8_linear(x, norm_weight, eps, qweight, scale)

    @staticmethod
    def _native_int8(lib, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> bool:
        return (
            lib is not None
            and x.dtype == torch.float32
            and scale.dtype == torch.float32
            and x.numel() > 0
            and qweight.is_contiguous()
            and scale.is_contiguous()
        )

    # Full-precision projection weights handed over here (the vocabulary head, and the projections of
    # the fused MLA decode layer) are repacked at load into 16-column panels (cpu_kernels/
    # gemm_packed.c), which every row count then multiplies, prefill included. Against the row-major
    # native kernel, alternating, 12 cold copies each of the small benchmark model's MLA projections
    # (800 x 1,024, 1,536 x 512, 1,024 x 1,024): 1.08-1.12x the time at one row, 0.66-0.73x at 8 to 64
    # rows, and at 512 and 2,048 rows 0.58-0.61x, level with MKL's GEMM (0.58-0.67x). The vocabulary
    # head, best of 5: 129,280 x 256 at 64 rows 47.8 vs 25.9 ms, 8 rows 6.9 vs 5.1, one row 4.1 vs 4.2;
    # 129,280 x 1,024 at 64 rows 167 vs 109 ms, one row 19.4 vs 17.8. An int8 weight goes into int8
    # panels (gemm_int8_panels.c), which against the row-major integer kernel, alternating, take on the
    # small model's 129,280 x 1,024 head (medians of 7) 0.73x the time at 32 rows, 0.71x at 64, 0.80x
    # at 8 and 1.01-1.07x at one, and on 12 cold copies of its MLA projections (median ratio of 41
    # pairs, then medians of 3-9) 1.05-1.06x at one row, 1.02x at 4, 0.97x at 8, 0.83x at 32, 0.74x
    # at 64, 0.67x at 512 and 0.60x at 2,048.
    def prepare_linear(self, weight: torch.Tensor):
        lib = cpu_kernels.load()
        if lib is not None and cpu_kernels.can_pack(weight):
            return cpu_kernels.pack_weight(lib, weight)  # in place: the caller drops its [N, K] view
        if lib is not None and weight.dtype == torch.int8 and weight.dim() == 2:
            return cpu_kernels.pack_int8_panels(weight)
        return weight

    def prepare_experts(self, weight: torch.Tensor) -> torch.Tensor:
        # Full-precision experts packed into panels, as the vocabulary head is: moe_f32 then runs a
        # few rows per expert (decode at 8-64 sequences) in 0.6-0.9 of the row-major time, and a
        # prefill's many without transposing a panel per call (see moe_f32 in cpu_kernels/gemm.c).
        lib = cpu_kernels.load()
        if lib is not None and cpu_kernels.can_pack_int8_experts(weight):
            return cpu_kernels.pack_int8_experts(weight)
        return cpu_kernels.pack_experts(lib, weight) if lib is not None and cpu_kernels.can_pack_experts(weight) else weight

    def prepare_absorbed(self, weight: torch.Tensor) -> torch.Tensor:
        # bf16 when it holds every value exactly (a bf16 checkpoint's): the native decode widens it
        # with a shift, and batch-1 decode reads 1 MB less per layer of the small benchmark model.
        narrow = weight.to(torch.bfloat16)
        return narrow if torch.equal(narrow.float(), weight) else weight

    def linear(self, x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
        lib = cpu_kernels.load()
        if isinstance(weight, cpu_kernels.PackedWeight):  # prepare_linear made it, so lib exists
            out = cpu_kernels.linear_packed(lib, x.float(), weight)  # fp32; a bf16 model's rounded once
            return (out if bias is None else out + bias).to(x.dtype)
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        # Up to 32 rows the native kernel beats MKL's GEMM on the model's shapes (129,280 x 256 fp32:
        # 7.3 vs 14.7 ms at one row, 9.0 vs 35.4 at eight; 1.2-1.5x at 32 rows). Beyond that MKL's
        # blocking wins or ties on weights a cache can hold (64 x 256 x 1,024: 0.42 vs 0.49 ms), but a
        # vocabulary projection, which no cache holds, still streams faster natively (129,280 x 256:
        # 43 vs 67 ms at 48 rows, 58 vs 71 at 64).
        max_rows = 64 if weight.numel() * weight.element_size() >= LARGE_WEIGHT_BYTES else 32
        native = lib is not None and 0 < rows <= max_rows and weight.is_contiguous()
        if weight.dtype == torch.bfloat16 and x.dtype in cpu_kernels.WEIGHT_DTYPES:
            # A bf16 model's weight, summed in fp32 and rounded to x's dtype once, as a bf16 GEMM
            # with fp32 accumulation does. Without native bf16 (AVX2, no AVX512-BF16 or AMX) torch
            # emulates that GEMM, slower than fp32 (a small-model batch-1 step: 97 ms, see
            # BENCHMARKS.md): the native kernel widens the weight by a shift instead, and many rows
            # (a prefill) meet an fp32 copy of it in MKL's fp32 GEMM.
            out = cpu_kernels.linear_f32(lib, x.float(), weight) if native else F.linear(x.float(), weight.float())
            return (out if bias is None else out + bias).to(x.dtype)
        if native and x.dtype == weight.dtype == torch.float32:
            out = cpu_kernels.linear_f32(lib, x, weight)
            return out if bias is None else out + bias
        return F.linear(x, weight, bias)

    def mla_prefill(self, q, context, kv_b_weight, num_heads, qk_nope_head_dim, v_head_dim, scale):
        """A bf16 model's prefill attention in fp32 (its bf16 cache and kv_b weight widened), the
        result in q's dtype: torch emulates the bf16 decompression GEMM here (no AVX512-BF16 or AMX),
        45 ms a layer for a 512-token prompt of the small benchmark model, against ~3 in fp32, which
        was half of that prompt's prefill."""
        if torch.bfloat16 not in (q.dtype, context.dtype, kv_b_weight.dtype):
            return ops.mla_prefill(q, context, kv_b_weight, num_heads, qk_nope_head_dim, v_head_dim, scale)
        out = ops.mla_prefill(
            q.float(), context.float(), kv_b_weight.float(), num_heads, qk_nope_head_dim, v_head_dim, scale
        )
        return out.to(q.dtype)

    # Greedy rows screen the head in int8 and recompute the few tokens that could win with the fp32
    # panels, so the tokens are the full product's (cpu_kernels/greedy_head.c). The small benchmark
    # model's 129,280 x 1,024 head, alternating with the full product and argmax: 0.59x the time at
    # 64 rows, 0.41x at 8, 0.28x at one, for an int8 copy a quarter of the fp32 head's size.
    def prepare_greedy_head(self, weight: torch.Tensor):
        lib = cpu_kernels.load()
        if lib is None or not cpu_kernels.can_pack(weight):
            return None
        start = time.perf_counter()
        screen = cpu_kernels.greedy_screen(weight)
        logger.info("int8 screen of the vocabulary head for greedy rows: %.2f GB in %.1fs",
                    0 if screen is None else screen.q.panels.numel() / 1e9, time.perf_counter() - start)
        return screen

    def greedy_head(self, hidden: torch.Tensor, weight, screen) -> torch.Tensor:
        lib = cpu_kernels.load()
        if screen is not None and isinstance(weight, cpu_kernels.PackedWeight) and hidden.dtype == torch.float32:
            return cpu_kernels.greedy_head(lib, hidden, weight, screen)
        return super().greedy_head(hidden, weight, screen)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        lib = cpu_kernels.load()
        if lib is not None and logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(-1) == 1 and logits.shape[-1]:
            return cpu_kernels.argmax_rows(lib, logits)
        return super().argmax(logits)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        lib = cpu_kernels.load()
        if lib is not None and x.dtype == torch.float32 and weight.dtype == torch.float32 and weight.is_contiguous():
            return cpu_kernels.rms_norm(lib, x, weight, eps)
        return ops.rms_norm(x, weight, eps)

    def mla_write_latent(self, q, kv_a, norm_weight, eps, cos, sin, interleaved, cache, slot_mapping):
        lib = cpu_kernels.load()
        full = cpu_kernels.WEIGHT_DTYPES
        if (
            lib is not None
            and q.dtype in full and kv_a.dtype in full and norm_weight.dtype in full and cos.dtype in full
            and cache.dtype in full and q.stride(-1) == 1 and kv_a.stride(-1) == 1 and cache.is_contiguous()
            and slot_mapping.dtype == torch.int64
        ):
            # a bf16 model's rows are widened, normalised and rotated in fp32 and rounded once
            wide = q.float()
            cpu_kernels.mla_write_latent(
                lib, wide, kv_a.float(), norm_weight.float(), eps, cos.float(), sin.float(), interleaved, cache, slot_mapping
            )
            if wide is not q:
                q.copy_(wide)
        else:
            super().mla_write_latent(q, kv_a, norm_weight, eps, cos, sin, interleaved, cache, slot_mapping)

    def mla_decode(self, q_nope, q_pe, w_uk, w_uv, cache, block_tables, seq_lens, scale):
        lib = cpu_kernels.load()
        full = cpu_kernels.WEIGHT_DTYPES
        if (
            lib is not None
            and cache.dtype in full and q_nope.dtype in full and q_pe.dtype in full
            and w_uk.dtype == w_uv.dtype and w_uk.dtype in full
            and cache.is_contiguous() and w_uk.is_contiguous() and w_uv.is_contiguous()
            and block_tables.dtype == seq_lens.dtype == torch.int64
        ):
            return cpu_kernels.mla_decode(lib, q_nope.float(), q_pe.float(), w_uk, w_uv, cache, block_tables, seq_lens, scale)
        return super().mla_decode(q_nope, q_pe, w_uk, w_uv, cache, block_tables, seq_lens, scale)

    # Decode rows up to which a full-precision layer or stack runs natively; beyond, the layers are
    # composed from the hooks and MKL's GEMM takes the projections (see linear). At 64 rows the
    # native stack still wins, alternating runs, median step: small bf16 596 -> 510 ms, fp32 598 ->
    # 575; tiny bf16 70 -> 65, fp32 83 -> 79. Not measured beyond 64.
    full_precision_rows = 64

    def mla_decode_layer(self, h, layer, cos, sin, interleaved, cache, slot_mapping, block_tables, seq_lens):
        lib = cpu_kernels.load()
        f32 = torch.float32
        if (
            lib is not None
            and self._native_layer(layer)
            and (layer.o_scale is not None or h.shape[0] <= self.full_precision_rows)
            and h.dtype == cos.dtype == sin.dtype == f32 and cache.dtype in cpu_kernels.WEIGHT_DTYPES
            and h.dim() == 2 and h.is_contiguous() and cache.is_contiguous()
            and slot_mapping.dtype == block_tables.dtype == seq_lens.dtype == torch.int64
        ):
            return cpu_kernels.mla_decode_layer(lib, h, layer, cos, sin, interleaved, cache, slot_mapping, block_tables, seq_lens)
        return super().mla_decode_layer(h, layer, cos, sin, interleaved, cache, slot_mapping, block_tables, seq_lens)

    def folds_shared_experts(self, dtype: torch.dtype) -> bool:
        # moe_f32 sums every expert's output in fp32 and rounds once, whatever the weights' dtype
        return dtype in cpu_kernels.WEIGHT_DTYPES and cpu_kernels.load() is not None

    def decode_layers(self, h, stack, cos, sin, interleaved, caches, slot_mapping, block_tables, seq_lens):
        lib = cpu_kernels.load()
        table = self._native_stack(lib, stack) if lib is not None else None
        full = cpu_kernels.WEIGHT_DTYPES
        if (
            table is not None
            and (stack.layers[0].attention.o_scale is not None or h.shape[0] <= self.full_precision_rows)
            and h.dtype in full and cos.dtype in full and sin.dtype in full and h.dim() == 2
            and caches[0].dtype in full and all(c.dtype == caches[0].dtype and c.is_contiguous() for c in caches)
            and slot_mapping.dtype == block_tables.dtype == seq_lens.dtype == torch.int64
        ):
            # a bf16 model's rows go through every layer in fp32 and are rounded once, at the end
            out = cpu_kernels.decode_stack(
                lib, h.float().contiguous(), table, cos.float(), sin.float(), interleaved, caches, slot_mapping,
                block_tables, seq_lens,
            )
            return out.to(h.dtype)
        return super().decode_layers(h, stack, cos, sin, interleaved, caches, slot_mapping, block_tables, seq_lens)

    # DecodeStack -> (decode_stack.c's argument table, the bundles it points into), or None where a
    # layer is not one it runs: built on a stack's first step (its tensors never move), so a step
    # passes one pointer for all layers.
    _native_stacks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _native_stack(self, lib, stack):
        if stack not in self._native_stacks:
            layers = tuple(self._fp32_norms(layer) for layer in stack.layers)
            native = all(self._native_layer(layer.attention) and self._native_block(lib, layer.ffn) for layer in layers)
            table = cpu_kernels.decode_stack_table(ops.DecodeStack(layers)) if native and layers else None
            self._native_stacks[stack] = None if table is None else (table, layers)  # the table points into layers
        entry = self._native_stacks[stack]
        return None if entry is None else entry[0]

    @staticmethod
    def _fp32_norms(layer: ops.DecodeLayer) -> ops.DecodeLayer:
        """The layer with fp32 norm weights: the native stack normalises in fp32. A model's norms are
        fp32 already (RMSNorm keeps them in the activations' dtype); a caller's bundle with bf16
        norms (Platform.decode_layers allows them) gets fp32 copies, a few KB a layer."""
        attention = dataclasses.replace(
            layer.attention, **{name: getattr(layer.attention, name).float() for name in ("input_norm", "q_a_norm", "kv_a_norm")}
        )
        return ops.DecodeLayer(attention, dataclasses.replace(layer.ffn, norm=layer.ffn.norm.float()))

    def _native_block(self, lib, block) -> bool:
        """Whether moe_routed_f32 runs this feed-forward bundle. The activations' dtype is checked
        per step (decode_layers); here the fp32 norm weight stands in for them."""
        f32 = torch.float32
        routed = block.router is None or self._native_routing(lib, block.norm, block.router, block.bias, block.routing)
        return (
            routed
            and (block.router is not None or block.num_shared > 0)
            and self._native_experts(lib, block.norm, block.w13, block.w2, block.w13_scale, block.w2_scale)
            and block.norm.dtype == f32 and block.norm.is_contiguous()
            and all(s is None or (s.dtype == f32 and s.is_contiguous()) for s in (block.w13_scale, block.w2_scale))
        )

    # MLADecodeLayer -> whether mla_layer.c reads it: a bundle's tensors are fixed once it is built, so
    # each is checked on its first step, not on every step of every layer.
    _native_layers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _native_layer(self, layer) -> bool:
        native = self._native_layers.get(layer)
        if native is None:
            f32 = torch.float32
            projections = tuple(cpu_kernels.stored(p) for p in (layer.q_kv_a, layer.q_b, layer.o))  # packed or not
            scales = (layer.q_kv_a_scale, layer.q_b_scale, layer.o_scale)
            if all(s is None for s in scales):  # full precision: one dtype the fp32 kernels read
                weights_ok = projections[0].dtype in cpu_kernels.WEIGHT_DTYPES and all(
                    p.dtype == projections[0].dtype for p in projections)
            else:  # int8, all row-major or all in int8 panels (one flag tells mla_layer.c)
                in_panels = {isinstance(p, cpu_kernels.Int8Panels) for p in (layer.q_kv_a, layer.q_b, layer.o)}
                weights_ok = all(p.dtype == torch.int8 for p in projections) and len(in_panels) == 1 and all(
                    s is not None and s.dtype == f32 and s.is_contiguous() for s in scales)
            native = self._native_layers[layer] = (
                weights_ok
                and all(p.is_contiguous() for p in projections)
                and all(t.dtype == f32 and t.is_contiguous() for t in (layer.input_norm, layer.q_a_norm, layer.kv_a_norm))
                and layer.w_uk.dtype == layer.w_uv.dtype and layer.w_uk.dtype in (f32, torch.bfloat16)
                and layer.w_uk.is_contiguous() and layer.w_uv.is_contiguous()
            )
        return native

    def route_experts(self, x, weight, bias, routing):
        lib = cpu_kernels.load()
        if self._native_routing(lib, x, weight, bias, routing):
            return cpu_kernels.route_experts(lib, x, weight, bias, routing)
        return ops.route_experts(x, weight, bias, routing)

    @staticmethod
    def _native_routing(lib, x, weight, bias, routing) -> bool:
        return (
            lib is not None
            and x.dtype == weight.dtype == torch.float32
            and weight.is_contiguous()
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous()))
            and routing.scoring in cpu_kernels.SCORING
            and routing.method in cpu_kernels.METHODS
        )

    def moe_experts(self, x, topk_ids, topk_weights, w13, w2, w13_scale=None, w2_scale=None):
        lib = cpu_kernels.load()
        if self._native_experts(lib, x, w13, w2, w13_scale, w2_scale):
            s13, s2 = _fp32(w13_scale), _fp32(w2_scale)
            return cpu_kernels.moe(lib, x.float(), topk_ids, topk_weights, w13, s13, w2, s2).to(x.dtype)
        return ops.moe_experts(x, topk_ids, topk_weights, w13, w2, w13_scale, w2_scale, int8_matmul=self.int8_linear)

    @staticmethod
    def _native_experts(lib, x, w13, w2, w13_scale, w2_scale) -> bool:
        """Whether moe_f32 runs these experts: int8 with per-row scales (passed in fp32), or fp32 or
        bf16 weights, on fp32 or bf16 rows (bf16 rows are widened first and the sum rounded back
        once, as a GEMM with fp32 accumulation would, at each expert; torch emulates those here).
        Experts the platform packed (prepare_experts) have no other reader."""
        if w13_scale is None:
            weights_ok = w13.dtype == w2.dtype and w13.dtype in cpu_kernels.WEIGHT_DTYPES
        else:
            weights_ok = w13.dtype == w2.dtype == torch.int8 and w13_scale.is_floating_point() and w2_scale.is_floating_point()
        rows_ok = x.dtype in cpu_kernels.WEIGHT_DTYPES
        if w13_scale is not None and cpu_kernels.is_packed_experts(w13) != cpu_kernels.is_packed_experts(w2):
            raise ValueError("int8 experts prepared apart: prepare w13 and w2 together (Experts.prepare)")
        return lib is not None and weights_ok and rows_ok and w13.is_contiguous() and w2.is_contiguous()

    def route_and_run_experts(
        self, x, router_weight, bias, routing, num_shared, w13, w2, w13_scale=None, w2_scale=None,
        norm_weight=None, eps=0.0, add_input=False,
    ):
        lib = cpu_kernels.load()
        rows = x.float()  # x itself when fp32; bf16 rows (a bf16 model's) are routed and run in fp32
        if (
            self._native_routing(lib, rows, router_weight, bias, routing)
            and self._native_experts(lib, x, w13, w2, w13_scale, w2_scale)
            and x.dim() == 2
            and (norm_weight is None or (norm_weight.dtype == torch.float32 and norm_weight.is_contiguous()))
        ):
            return cpu_kernels.moe_routed(
                lib, rows, router_weight, bias, routing, num_shared, w13, _fp32(w13_scale), w2, _fp32(w2_scale), norm_weight,
                eps, add_input,
            ).to(x.dtype)
        return super().route_and_run_experts(
            x, router_weight, bias, routing, num_shared, w13, w2, w13_scale, w2_scale, norm_weight, eps, add_input
        )


def _fp32(scale: torch.Tensor | None) -> torch.Tensor | None:
    """Per-row int8 scales as the native kernels read them (a bf16 model keeps its scales in bf16)."""
    return None if scale is None else scale.float().contiguous()
