"""Published MoE models: architectures from their papers/configs, and the counts they publish.

`CATALOG[name]` is an `Architecture` built from the model's paper or released config.json.
`CLAIMS` lists every published count with its source (a key of book/references.bib) and the
counting convention under which `count_params` reproduces it; tests/test_scaling.py checks them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .arch import GQA, MHA, MLA, ActiveEmbeddings, Architecture
from .count import COMPONENTS, _check_convention, count_params, param_breakdown


def _mla(n_heads: int, q_lora_rank: int | None) -> MLA:
    """DeepSeek-V2/V3 and Kimi K2 share these MLA widths; only heads and q rank differ."""
    return MLA(n_heads=n_heads, q_lora_rank=q_lora_rank, kv_lora_rank=512,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)


_MODELS = [
    Architecture(name="Mixtral-8x7B", n_layers=32, d_model=4096, vocab_size=32000,
                 attention=GQA(n_heads=32, n_kv_heads=8, head_dim=128),
                 n_routed_experts=8, top_k=2, d_ff_expert=14336),
    Architecture(name="Mixtral-8x22B", n_layers=56, d_model=6144, vocab_size=32000,
                 attention=GQA(n_heads=48, n_kv_heads=8, head_dim=128),
                 n_routed_experts=8, top_k=2, d_ff_expert=16384),
    Architecture(name="DBRX", n_layers=40, d_model=6144, vocab_size=100352,
                 attention=GQA(n_heads=48, n_kv_heads=8, head_dim=128),
                 n_routed_experts=16, top_k=4, d_ff_expert=10752),
    Architecture(name="DeepSeek-V2", n_layers=60, d_model=5120, vocab_size=102400,
                 attention=_mla(128, 1536), n_routed_experts=160, top_k=6, d_ff_expert=1536,
                 n_shared_experts=2, first_dense_layers=1, d_ff_dense=12288),
    Architecture(name="DeepSeek-V3", n_layers=61, d_model=7168, vocab_size=129280,
                 attention=_mla(128, 1536), n_routed_experts=256, top_k=8, d_ff_expert=2048,
                 n_shared_experts=1, first_dense_layers=3, d_ff_dense=18432, mtp_modules=1),
    Architecture(name="Kimi-K2", n_layers=61, d_model=7168, vocab_size=163840,
                 attention=_mla(64, 1536), n_routed_experts=384, top_k=8, d_ff_expert=2048,
                 n_shared_experts=1, first_dense_layers=1, d_ff_dense=18432),
    Architecture(name="Qwen3-30B-A3B", n_layers=48, d_model=2048, vocab_size=151936,
                 attention=GQA(n_heads=32, n_kv_heads=4, head_dim=128, qk_norm=True),
                 n_routed_experts=128, top_k=8, d_ff_expert=768),
    Architecture(name="Qwen3-235B-A22B", n_layers=94, d_model=4096, vocab_size=151936,
                 attention=GQA(n_heads=64, n_kv_heads=4, head_dim=128, qk_norm=True),
                 n_routed_experts=128, top_k=8, d_ff_expert=1536),
    Architecture(name="Llama-4-Scout", n_layers=48, d_model=5120, vocab_size=202048,
                 attention=GQA(n_heads=40, n_kv_heads=8, head_dim=128),
                 n_routed_experts=16, top_k=1, d_ff_expert=8192, n_shared_experts=1),
    Architecture(name="Llama-4-Maverick", n_layers=48, d_model=5120, vocab_size=202048,
                 attention=GQA(n_heads=40, n_kv_heads=8, head_dim=128),
                 n_routed_experts=128, top_k=1, d_ff_expert=8192, n_shared_experts=1,
                 moe_every=2, d_ff_dense=16384),
    Architecture(name="gpt-oss-20b", n_layers=24, d_model=2880, vocab_size=201088,
                 attention=GQA(n_heads=64, n_kv_heads=8, head_dim=64, bias=True, sinks=True),
                 n_routed_experts=32, top_k=4, d_ff_expert=2880, ffn_bias=True,
                 router_bias=True),
    Architecture(name="gpt-oss-120b", n_layers=36, d_model=2880, vocab_size=201088,
                 attention=GQA(n_heads=64, n_kv_heads=8, head_dim=64, bias=True, sinks=True),
                 n_routed_experts=128, top_k=4, d_ff_expert=2880, ffn_bias=True,
                 router_bias=True),
    # Encoder-decoder (T5 v1.0 style): 15 encoder + 15 decoder blocks, every FFN a Switch layer,
    # ReLU experts (2 matrices), decoder blocks add cross-attention, one shared embedding.
    Architecture(name="Switch-C", n_layers=30, n_cross_attn_layers=15, d_model=2080,
                 vocab_size=32128, attention=MHA(n_heads=32, head_dim=64),
                 n_routed_experts=2048, top_k=1, d_ff_expert=6144, expert_glu=False,
                 tied_embeddings=True),
    # MoE in every other block; GLU only in the dense (non-MoE) FFNs, GELU 2-matrix experts.
    Architecture(name="GLaM-64B/64E", n_layers=64, d_model=8192, vocab_size=256000,
                 attention=MHA(n_heads=128, head_dim=128), n_routed_experts=64, top_k=2,
                 d_ff_expert=32768, moe_every=2, d_ff_dense=32768, expert_glu=False,
                 dense_glu=True, tied_embeddings=True),
]

CATALOG: dict[str, Architecture] = {m.name: m for m in _MODELS}


@dataclass(frozen=True, kw_only=True)
class Claim:
    """A published parameter count and how to reproduce it with `count_params`.

    `rounding`: when a source gives a number to few digits (GLaM's "1.2T"), the claim holds if
    our count rounds to it, i.e. lies within rounding / 2; otherwise within `rel_tol`.
    `component`: compare one entry of `param_breakdown` instead of the whole model.
    `checkpoint_duplicates`: extra embedding-sized matrices a checkpoint stores twice.
    """

    model: str
    total: float | None
    active: float | None = None
    cite: tuple[str, ...]
    active_embeddings: ActiveEmbeddings = "both"
    include_mtp: bool = False
    component: str | None = None
    checkpoint_duplicates: int = 0
    rounding: float | None = None
    rel_tol: float = 0.02
    note: str = ""

    def __post_init__(self):
        if self.model not in CATALOG:
            raise ValueError(f"Claim.model {self.model!r} is not in CATALOG; known: "
                             + ", ".join(map(repr, CATALOG)))
        if self.component is not None and self.component not in COMPONENTS:
            raise ValueError(f"Claim.component must be one of {COMPONENTS}, "
                             f"got {self.component!r}")
        _check_convention(self.active_embeddings)
        if not self.cite:
            raise ValueError("Claim.cite must name at least one bibliography key")

    def reproduce(self) -> tuple[int, int]:
        """Our (total, active) under this claim's convention."""
        m = CATALOG[self.model]
        kw = dict(include_mtp=self.include_mtp, active_embeddings=self.active_embeddings)
        if self.component is not None:
            return param_breakdown(m, **kw)[self.component]
        total, active = count_params(m, **kw)
        return total + self.checkpoint_duplicates * m.vocab_size * m.d_model, active

    def agrees(self, ours: float, published: float, *, use_rounding: bool) -> bool:
        if use_rounding and self.rounding is not None:
            return abs(ours - published) <= self.rounding / 2
        return abs(ours - published) <= self.rel_tol * published


B, T = 1e9, 1e12
CLAIMS: tuple[Claim, ...] = (
    Claim(model="Mixtral-8x7B", total=46.7 * B, active=12.9 * B,
          cite=("mistral2023mixtral", "jiang2024mixtral"),
          note="The paper rounds to 47B/13B; the release post gives 46.7B/12.9B."),
    Claim(model="Mixtral-8x22B", total=141 * B, active=39 * B, cite=("mistral2024mixtral8x22b",)),
    Claim(model="DBRX", total=132 * B, active=36 * B, cite=("databricks2024dbrx",)),
    Claim(model="DeepSeek-V2", total=236 * B, active=21 * B, cite=("deepseekai2024v2",),
          active_embeddings="output", note="DeepSeek's convention, stated for V3: the input "
          "embedding is not an activated parameter, the output head is."),
    Claim(model="DeepSeek-V3", total=671 * B, active=37 * B, cite=("deepseekai2024v3",),
          active_embeddings="output", note="671B is the main model without its MTP module."),
    Claim(model="DeepSeek-V3", total=671 * B, active=36.6 * B, cite=("deepseekai2024v3weights",),
          active_embeddings="output",
          note="Weights documentation: 36.6B activated, including the 0.9B output head."),
    Claim(model="DeepSeek-V3", total=11.5 * B, component="mtp", include_mtp=True,
          cite=("deepseekai2024v3weights",),
          note="The MTP module's own parameters; it shares the embedding and output head."),
    Claim(model="DeepSeek-V3", total=685 * B, include_mtp=True, checkpoint_duplicates=2,
          cite=("deepseekai2024v3weights",),
          note="685B is what the checkpoint stores: main model, MTP module, and the MTP "
          "module's copies of the shared embedding and output head (0.9B each)."),
    Claim(model="Kimi-K2", total=1.04 * T, active=32.6 * B, cite=("kimiteam2025k2",),
          note="32.6B is reproduced only when the input embedding counts as active."),
    Claim(model="Qwen3-30B-A3B", total=30.5 * B, active=3.3 * B, cite=("qwen2025qwen330bcard",)),
    Claim(model="Qwen3-235B-A22B", total=235 * B, active=22 * B, cite=("yang2025qwen3",)),
    Claim(model="Llama-4-Scout", total=109 * B, active=17 * B, cite=("meta2025llama4",),
          note="Text model only; the published total also holds the vision encoder."),
    Claim(model="Llama-4-Maverick", total=400 * B, active=17 * B, cite=("meta2025llama4",)),
    Claim(model="gpt-oss-20b", total=20.91 * B, active=3.61 * B, cite=("openai2025gptoss",),
          active_embeddings="output", note="The model card counts the unembedding as active "
          "but not the embedding."),
    Claim(model="gpt-oss-120b", total=116.83 * B, active=5.13 * B, cite=("openai2025gptoss",),
          active_embeddings="output"),
    Claim(model="Switch-C", total=1571 * B, cite=("fedus2022switch",),
          note="Encoder-decoder: 15 + 15 blocks, all with 2048 experts."),
    Claim(model="GLaM-64B/64E", total=1.2 * T, active=96.6 * B, cite=("du2022glam",),
          rounding=0.1 * T, note="Published as 1.2T, two significant figures; the architecture "
          "gives 1.16T. 96.6B is matched with GLU dense FFNs, GELU experts and a shared "
          "input/output embedding."),
)
