"""Which per-request ADSA settings an engine can honour, decided in the API process before the engine sees a request
(issue 22), tested without a server: the one scorer resolver (`adsa_vllm.policy.resolve_scorers`) and the CUDA-graph
rule (`adsa_vllm.request_validation.attention_in_cuda_graphs`).

A query-dependent policy (attention_mass) scores with the decode query, which each attention forward saves with a
copy that only an engine whose default policy needs the query captures in its CUDA graphs
(adsa_vllm/worker/saved_queries.py). No engine on this CPU machine runs attention in CUDA graphs (vLLM sets
cudagraph_mode NONE on a platform without static graphs, with or without --enforce-eager), so no CPU server can be
made to give that refusal: the rule is tested here on vLLM's own CompilationConfig resolution, as a GPU engine
resolves it. tests/test_server.py checks over HTTP every refusal a CPU server can give.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from adsa_vllm.config import GRANULARITIES, ADSAConfig
from adsa_vllm.errors import ADSAConfigError, SettingsError
from adsa_vllm.guidance.settings import GuidanceSettings
from adsa_vllm.llamagen.config import LlamaGenConfig
from adsa_vllm.policy import POLICIES, BlockScorer, needs_query, resolve_scorers
from adsa_vllm.policy.token_scores import TokenScorer
from adsa_vllm.policy.token_select import OldestBlocks
from adsa_vllm.request_validation import EngineLimits, attention_in_cuda_graphs, validate_settings
from adsa_vllm.settings import ADSASettings, EngineSettings

MODEL = LlamaGenConfig(dim=64, n_layer=2, n_head=2, codebook_size=512, num_classes=10, grid_size=16)
# the registry's query-dependent policies (checked below)
QUERY_POLICIES = {"attention_mass", "row_anchored", "head_split"}


def _engine(**defaults) -> EngineSettings:
    adsa = ADSASettings(defaults=ADSAConfig(**defaults), block_size=16, cls_token_num=MODEL.cls_token_num,
                        grid_size=MODEL.grid_size)
    return EngineSettings(adsa=adsa, guidance=GuidanceSettings(False))


def _compilation(mode: str, splitting_ops=None):
    """vLLM's CompilationConfig for `mode`, its split points resolved as VllmConfig resolves them (GPU, compiled)."""
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CompilationMode
    config = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=mode, splitting_ops=splitting_ops)
    config.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")
    return config


# ====================================================================== the scorer resolver

@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("policy", POLICIES)
def test_resolve_scorers_gives_each_policy_its_own_scorer_at_each_granularity(policy, granularity):
    config = ADSAConfig(policy=policy, granularity=granularity, keep="similar", seed=5)
    layout = config.layout(block_size=16, cls_token_num=1, grid_size=16)
    for settings in (config, layout):   # a config and the layout it gives resolve alike
        block, token = resolve_scorers(settings)
        if granularity == "block":
            assert type(block) is BlockScorer.registry[policy] and token is None
        else:   # the kept blocks are the oldest candidates; the policy picks each head's tokens in them
            assert isinstance(block, OldestBlocks) and type(token) is TokenScorer.registry[policy]
        ours = token if granularity == "token" else block
        assert getattr(ours, "keep", "similar") == "similar" and getattr(ours, "seed", 5) == 5
    assert needs_query(config) == (policy in QUERY_POLICIES)


def test_a_policy_without_a_scorer_at_a_granularity_is_refused_naming_the_fix(monkeypatch):
    """A future policy without a token scorer: refused by the settings themselves (startup, API, scheduler and
    worker all build them), never an error in the worker."""
    monkeypatch.delitem(TokenScorer.registry, "streaming")
    match = r"""adsa\.policy='streaming' has no token-granularity scorer: with "granularity": "token" choose one """ \
            r"""of attention_mass, head_split, random, row_anchored, topk_v, or keep 'streaming' with "granularity": """ \
            r""""block\""""
    with pytest.raises(ADSAConfigError, match=match):
        ADSAConfig(policy="streaming", granularity="token")
    limits = EngineLimits(model=MODEL, engine=_engine())
    with pytest.raises(SettingsError, match=match):
        validate_settings({"adsa": {"policy": "streaming", "granularity": "token"}}, limits)
    validate_settings({"adsa": {"policy": "streaming"}}, limits)   # the block scorer is still there


def test_the_worker_resolves_the_same_scorers_once_per_setting():
    from adsa_vllm.worker.runtime import ADSARuntime
    rt = ADSARuntime(_engine().adsa)
    for i, over in enumerate([{"policy": "attention_mass", "granularity": "token"}, {"policy": "attention_mass",
                              "granularity": "token", "budget": 96}, {"policy": "topk_v", "keep": "similar"}]):
        rt._start(f"r{i}", SimpleNamespace(extra_args={"adsa": over}), first_block=i + 1)
    seqs = [rt._by_req[f"r{i}"] for i in range(3)]
    for seq in seqs:   # the same classes and settings (OldestBlocks has no fields to compare)
        got, want = (seq.scorer, seq.token_scorer), resolve_scorers(seq.layout)
        assert [(type(s), vars(s) if s is not None else None) for s in got] == \
            [(type(s), vars(s) if s is not None else None) for s in want]
    assert seqs[0].token_scorer is seqs[1].token_scorer   # one instance per setting: scored in one call


# ====================================================================== the CUDA-graph rule

@pytest.mark.parametrize("mode,splitting_ops,in_graphs", [
    ("NONE", None, False),                                   # --enforce-eager, CPU
    ("PIECEWISE", None, False),                              # attention runs between the captured pieces
    ("PIECEWISE", [], False),                                # vLLM turns this into NONE
    ("PIECEWISE", ["vllm::unified_kv_cache_update"], True),  # attention inside a piece
    ("FULL_AND_PIECEWISE", None, True),                      # the GPU default: decode steps replay whole forwards
    ("FULL_DECODE_ONLY", None, True),
    ("FULL", None, True),
])
def test_attention_in_cuda_graphs_follows_vllms_resolved_mode(mode, splitting_ops, in_graphs):
    compilation = _compilation(mode, splitting_ops)
    assert attention_in_cuda_graphs(compilation, _engine()) == in_graphs
    # A query-dependent default no longer keeps attention out of graphs (its graphs capture the query's copy).
    for granularity in GRANULARITIES:
        assert attention_in_cuda_graphs(compilation, _engine(policy="attention_mass", granularity=granularity)) \
            == in_graphs
    assert not attention_in_cuda_graphs(compilation, EngineSettings(adsa=None, guidance=GuidanceSettings(False)))


def test_a_query_dependent_default_keeps_the_kernels_graph_support():
    """The ADSA builder answers what its inner kernel's builder answers for a query-dependent default (no NEVER:
    vLLM keeps the GPU default FULL_AND_PIECEWISE), and NEVER only for token edges."""
    from vllm.v1.attention.backend import AttentionCGSupport
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from adsa_vllm.worker.backend import make_adsa_backend
    inner = CPUAttentionBackend.get_builder_cls()
    builder = make_adsa_backend(CPUAttentionBackend).get_builder_cls()
    for granularity in GRANULARITIES:
        spec = SimpleNamespace(adsa=_engine(policy="attention_mass", granularity=granularity).adsa)
        assert builder.get_cudagraph_support(None, spec) == inner.get_cudagraph_support(None, spec)
    edges = SimpleNamespace(adsa=_engine(policy="attention_mass", budget=40).adsa)
    assert edges.adsa.layout().token_edges
    assert builder.get_cudagraph_support(None, edges) == AttentionCGSupport.NEVER


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("default", [dict(policy="random"), dict(policy="attention_mass"),
                                     dict(policy="attention_mass", granularity="token")],
                         ids=["random", "attention_mass", "attention_mass-token"])
def test_per_request_policies_are_refused_exactly_where_they_cannot_run(graphs, default):
    engine = _engine(**default)
    compilation = _compilation("FULL_AND_PIECEWISE" if graphs else "NONE")
    limits = EngineLimits(model=MODEL, engine=engine,
                          attention_in_cuda_graphs=attention_in_cuda_graphs(compilation, engine))
    for policy in POLICIES:
        for granularity in GRANULARITIES:
            extra = {"adsa": {"policy": policy, "granularity": granularity}}
            refused = graphs and default["policy"] not in QUERY_POLICIES and policy in QUERY_POLICIES
            if not refused:
                assert validate_settings(extra, limits).layout.policy == policy
                continue
            with pytest.raises(SettingsError) as err:
                validate_settings(extra, limits)
            message = str(err.value)
            assert f"adsa.policy='{policy}'" in message and "CUDA graphs" in message, message
            assert f"--additional-config '{json.dumps({'adsa': {'policy': policy}})}'" in message, message
            assert "--enforce-eager" in message and "enforce_eager=True" in message, message


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_cpu_engines_run_attention_outside_graphs(enforce_eager, model16):
    """The limits as the API process decides them from a real CPU engine config: no graphs, with or without
    --enforce-eager, so a per-request attention-mass request is accepted there."""
    from vllm.engine.arg_utils import EngineArgs
    vc = EngineArgs(model=str(model16[0]), dtype="float32", attention_backend="adsa",
                    enforce_eager=enforce_eager).create_engine_config()
    limits = EngineLimits.from_vllm_config(vc)
    assert limits.engine.adsa is not None and not limits.attention_in_cuda_graphs
    for granularity in GRANULARITIES:
        validate_settings({"adsa": {"policy": "attention_mass", "granularity": granularity}}, limits)


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_head_split_blocks_are_refused_under_tensor_parallelism(tensor_parallel_size):
    """head_split's block form has no rank offset into its head classes: refused at TP > 1, naming the token form;
    its token form and every other policy run there."""
    limits = EngineLimits(model=MODEL, engine=_engine(), tensor_parallel_size=tensor_parallel_size)
    for policy in POLICIES:
        for granularity in GRANULARITIES:
            extra = {"adsa": {"policy": policy, "granularity": granularity}}
            if tensor_parallel_size > 1 and (policy, granularity) == ("head_split", "block"):
                with pytest.raises(SettingsError, match=r'tensor_parallel_size 2.*"granularity": "token"'):
                    validate_settings(extra, limits)
            else:
                assert validate_settings(extra, limits).layout.policy == policy


def test_token_granularity_is_refused_where_tensor_parallelism_replicates_kv_heads():
    """One KV head over two ranks: vLLM replicates it, and token granularity's per-rank head offset
    (worker/token_gather.head_offset) would name a head the model does not have; refused naming the block form."""
    gqa = LlamaGenConfig(dim=64, n_layer=2, n_head=2, n_kv_head=1, codebook_size=512, num_classes=10, grid_size=16)
    for tensor_parallel_size, refused in ((1, False), (2, True)):
        limits = EngineLimits(model=gqa, engine=_engine(), tensor_parallel_size=tensor_parallel_size)
        assert validate_settings({"adsa": {"granularity": "block"}}, limits).layout.granularity == "block"
        token = {"adsa": {"granularity": "token"}}
        if refused:
            with pytest.raises(SettingsError, match=r'1 KV heads .* tensor_parallel_size 2 .*"granularity": "block"'):
                validate_settings(token, limits)
        else:
            assert validate_settings(token, limits).layout.granularity == "token"
