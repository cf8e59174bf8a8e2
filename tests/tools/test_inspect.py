"""`qlora-compile inspect`: its byte counts and graphs equal a real compile's, a 70B config inspects
without weights, and the HTML page renders in a real (headless) browser."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import transformers

import qlora_compile
from qlora_compile import QLoRAConfig, quantize_weight
from qlora_compile.inspect import inspect_model, meta_quantizer, quantized_nbytes, rewrite_rows, trace
from qlora_compile.tools import cli
from qlora_compile.tools.inspect_view import render_html
from tests.models import build

SMALL_LLAMA = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}  # fmt: skip
LLAMA_2_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
               "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
               "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
               "rms_norm_eps": 1e-5, "torch_dtype": "float16"}  # fmt: skip


@pytest.mark.parametrize("shape", [(1,), (7, 9), (64, 64), (33, 97), (256 * 64 + 3,), (96, 160)])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantized_nbytes_equals_real(shape, blocksize, double_quant):
    qw = quantize_weight(torch.randn(shape), blocksize=blocksize, double_quant=double_quant)
    n = torch.Size(shape).numel()
    assert quantized_nbytes(n, blocksize, double_quant) == qw.nbytes


def _save(model_cls, config, directory: Path) -> Path:
    build(config, model_cls).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _save(
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig(**SMALL_LLAMA),
        tmp_path_factory.mktemp("llama"),
    )


def test_inspect_equals_real_compile(llama_dir):
    """Rewrite table, byte totals, graph count and pass counts equal model.qlora.report() of a real
    compile of the real weights, traced on the same input. The skip path is exercised too: the
    filter also selects the embedding, which compile skips (not a Linear)."""

    def targets(module, name):
        return isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) and "lm_head" not in name

    config = QLoRAConfig(target_modules=targets, backend="eager")
    result = inspect_model(llama_dir, layers=None, seq_len=12, config=config)

    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    qlora_compile.compile(model, config)
    model.train()
    ids = torch.randint(0, 128, (1, 12))
    model(ids, labels=ids, use_cache=False).loss.backward()
    report = model.qlora.report()

    assert result["rewrites"] == rewrite_rows(report.rewrites)
    assert [r["status"] for r in result["rewrites"]].count("skipped") == 1
    assert "not an nn.Linear" in result["rewrites"][0]["reason"]  # model.embed_tokens
    totals = report.totals()
    assert result["totals"]["bytes_before"] == totals["bytes_before"]
    assert result["totals"]["bytes_after"] == totals["bytes_after"]
    assert result["totals"]["bits_per_param"] == round(totals["bits_per_param"], 4)
    assert result["totals"]["graphs"] == report.graphs == 1
    assert result["totals"]["passes"] == dict(sorted(report.passes.items()))
    assert result["totals"]["modules_quantized"] == len(report.rewritten) == 14
    graph = result["graphs"][0]
    made = [n["pass"] for m in graph["modules"] for n in m["nodes"]]
    # one graph serves both layers (compile_scope="layers"): 7 products, q/k/v and gate/up merged
    assert made.count("fuse_lora") == graph["our_ops"]["qlora::lora_linear"] == 7 - 5
    assert graph["our_ops"]["qlora::lora_linear_cat"] == 2


FAMILIES = {
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)),
    "opt": (transformers.OPTForCausalLM, transformers.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                                num_attention_heads=4, word_embed_proj_dim=64)),
    "bert": (transformers.BertModel, transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                             num_hidden_layers=2, num_attention_heads=4)),
}  # fmt: skip


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rewrite_table_equals_real_rewrite(family, dtype):
    """Other families (GPT-2's Conv1D, OPT, BERT's pooler): the meta rewrite's rows equal the real
    storage rewrite's, skip of a non-linear target included."""
    cls, config = FAMILIES[family]
    qconfig = QLoRAConfig(target_modules=lambda m, n: not list(m.children()) and "lm_head" not in n)
    real = cls._from_config(config, dtype=dtype)
    with torch.device("meta"):
        meta = cls._from_config(config, dtype=dtype)
    rows = rewrite_rows(qlora_compile.pipeline.rewrite_storage(meta, qconfig, meta_quantizer(qconfig)))
    expected = rewrite_rows(qlora_compile.pipeline.rewrite_storage(real, qconfig))
    assert rows == expected and any(r["status"] == "skipped" for r in rows)
    assert sum(r["status"] == "quantized" for r in rows) == {"gpt2": 8, "opt": 12, "bert": 13}[family]


def test_graph_breaks_are_reported():
    class Breaks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

        def forward(self, x):
            x = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x)

    graphs, breaks = trace(Breaks(), (torch.randn(2, 8),), {})
    assert len(graphs) == 2 and len(breaks) == 1
    assert "graph_break" in breaks[0]["detail"] and "test_inspect.py" in breaks[0]["where"]


_PROBE_70B = """
import json, resource, sys
import torch, transformers
from qlora_compile.tools import cli
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
code = cli.main(["inspect", sys.argv[1], "--json"])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"code": code, "growth": peak - base}), file=sys.stderr)
"""


def test_llama_2_70b_config_inspects_without_weights(tmp_path):
    """A folder with only a Llama-2-70B config.json: the whole rewrite table, no weight allocated.

    The process's peak RSS grows far less than one decoder layer's dense weights (1.6 GiB in fp16;
    the model is 128 GiB)."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_2_70B))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE_70B, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    probe = json.loads(out.stderr.strip().splitlines()[-1])
    result = json.loads(out.stdout)
    assert probe["code"] == 0
    assert probe["growth"] < 768 * 2**20, f"peak RSS grew {probe['growth'] / 2**20:.0f} MiB"
    layer = 2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 28672 * 8192
    totals = result["totals"]
    assert totals["modules_quantized"] == 80 * 7 and totals["modules_skipped"] == 0
    assert totals["params_quantized"] == 80 * layer
    assert totals["bytes_before"] == 2 * 80 * layer  # float16, as the config says
    assert totals["bytes_after"] == 80 * sum(
        quantized_nbytes(o * i) for o, i in [(8192, 8192)] * 2 + [(1024, 8192)] * 2 + [(28672, 8192)] * 3
    )
    assert totals["bits_per_param"] == pytest.approx(4.127, abs=1e-3)
    assert result["traced"] == {"device": "meta", "layers": 2, "of_layers": 80, "batch_size": 1, "seq_len": 16,
                                "mode": "train", "call": "model(input_ids, labels=input_ids, attention_mask=ones)",
                                "error": None}  # fmt: skip
    # two variants of the one layer graph: the first layer reads the fp16 embeddings, the others
    # the fp32 residual stream that fp32 norms make (PEFT's policy)
    assert totals["graph_breaks"] == 0 and totals["graphs"] == 2 and totals["passes"]["fuse_lora"] == 2 * 7


def test_cli_json_schema_and_terminal_view(llama_dir, capsys):
    assert cli.main(["inspect", str(llama_dir), "--json", "--layers", "all"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["schema_version"] == 1
    assert set(result) == {
        "schema_version",
        "model",
        "config",
        "traced",
        "rewrites",
        "graphs",
        "graph_breaks",
        "totals",
    }
    assert set(result["rewrites"][0]) == {"name", "kind", "shape", "status", "reason", "bytes_before", "bytes_after",
                                          "bits_per_param"}  # fmt: skip
    node = result["graphs"][0]["modules"][0]["nodes"][0]
    assert set(node) == {"id", "name", "op", "target", "pass", "kernel", "shape", "inputs"}
    assert cli.main(["inspect", str(llama_dir)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.{0-1}.self_attn.q_proj (x2)" in out and "Captured graphs" in out
    assert "Graph breaks: none" in out and "fuse_lora: 7" in out


def test_cli_bad_input(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert cli.main(["inspect", str(tmp_path), "--layers", "0"]) == 2
    assert "--layers must be a positive integer or 'all'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The HTML page in a real browser. CI (where the CI variable is set, as .ci/run sets it) installs
# Chromium and this test fails if it is missing; a developer without Chromium gets an explicit skip.

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def _dump_dom(html: Path) -> str:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI (.ci/run installs it with apt-get)")
        pytest.skip("chromium not installed (apt-get install -y chromium); CI runs this test")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
               f"--user-data-dir={profile}", "--dump-dom", html.resolve().as_uri()]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout


class _Dom(HTMLParser):
    """Collects the rendered elements the test looks for."""

    def __init__(self):
        super().__init__()
        self.svgs, self.rows, self.rendered, self.external = [], [], False, []
        self._svg = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class") or ""
        if tag == "body" and a.get("data-rendered") == "yes":
            self.rendered = True
        if tag in ("script", "link", "img") and (a.get("src") or a.get("href")):
            self.external.append(a.get("src") or a.get("href"))
        if tag == "svg" and "graph" in cls.split():
            self._svg = {"graph": int(a["data-graph"]), "module": a["data-module"], "nodes": []}
            self.svgs.append(self._svg)
        if tag == "g" and "node" in cls.split() and self._svg is not None:
            self._svg["nodes"].append((a["data-name"], cls.split()))
        if tag == "tr" and "rewrite" in cls.split():
            self.rows.append(cls.split())


def test_html_page_renders_in_headless_chromium(tmp_path, llama_dir):
    result = inspect_model(llama_dir, layers=None, seq_len=12)
    html = tmp_path / "inspect.html"
    html.write_text(render_html(result))
    dom = _Dom()
    dom.feed(_dump_dom(html))
    assert dom.rendered and not dom.external  # the page's own script ran; nothing is fetched
    assert len(dom.rows) == len(result["rewrites"]) == 14
    assert all("quantized" in r for r in dom.rows)
    modules = [(g["index"], m) for g in result["graphs"] for m in g["modules"]]
    assert [(s["graph"], s["module"]) for s in dom.svgs] == [(i, m["name"]) for i, m in modules]
    for svg, (_, module) in zip(dom.svgs, modules, strict=True):
        assert [name for name, _ in svg["nodes"]] == [n["name"] for n in module["nodes"]]  # one per FX node
        for (_, classes), node in zip(svg["nodes"], module["nodes"], strict=True):
            assert f"pass-{node['pass'] or 'none'}" in classes
    drawn = [c for s in dom.svgs for _, c in s["nodes"]]
    ours = result["graphs"][0]["our_ops"]
    assert sum("pass-fuse_lora" in c for c in drawn) == ours["qlora::lora_linear"] == 2
    assert sum("pass-fuse_shared_input" in c for c in drawn) >= ours["qlora::lora_linear_cat"] == 2


def test_trace_failure_keeps_the_rewrite_table(llama_dir, monkeypatch):
    import qlora_compile.inspect as qinspect

    def fail(*args, **kwargs):
        raise RuntimeError("cannot trace this model\nmore detail")

    monkeypatch.setattr(qinspect, "trace", fail)
    result = inspect_model(llama_dir)
    assert result["traced"]["error"] == "RuntimeError: cannot trace this model"
    assert result["graphs"] == [] and result["totals"]["modules_quantized"] == 14
    assert "RuntimeError: cannot trace this model" in render_html(result)
