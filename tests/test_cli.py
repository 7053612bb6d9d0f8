import json
import subprocess
import sys
from pathlib import Path

from causalscan import zoo
from causalscan.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_patch_cli_json_and_files(tmp_path, capsys):
    rc = main(
        [
            "patch",
            "--model",
            "random:gpt2-tiny",
            "--data",
            str(ROOT / "examples/ioi.jsonl"),
            "--sites",
            "head,mlp_out",
            "--out",
            str(tmp_path),
            "--json",
        ]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["settings"]["sweeps"] == {"head": [2, 4], "mlp_out": [2, 15]}
    assert (tmp_path / "scan.json").is_file() and (tmp_path / "scores.safetensors").is_file()


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "Mary went to", "corrupt": "John went", "answer": "the"}\n')
    rc = main(["patch", "--model", "random:gpt2-tiny", "--data", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(f"causalscan: error: {bad}:1: field 'corrupt'")
    rc = main(["patch", "--model", "random:nope", "--data", str(ROOT / "examples/ioi.jsonl")])
    assert rc == 2 and "unknown random family" in capsys.readouterr().err


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "causalscan", "patch", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--direction" in out.stdout


def test_patch_defaults_to_the_zoo_dataset(tmp_path, capsys):
    """The README main job: a zoo model without --data patches its shipped dataset."""
    rc = main(["patch", "--model", "induction", "--sites", "head", "--out", str(tmp_path), "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    arch = zoo.card("induction")["architecture"]
    assert doc["dataset"]["path"].endswith("induction.jsonl")
    assert doc["settings"]["sweeps"] == {"head": [arch["n_layers"], arch["n_heads"]]}
    assert main(["patch", "--model", "random:gpt2-tiny"]) == 2
    assert "--data is required" in capsys.readouterr().err


def test_progress_bars_on_stderr_silent_under_json(capsys):
    """Bars with totals on stderr; none under --json unless --progress; stdout stays one JSON document."""
    argv = ["patch", "--model", "induction", "--sites", "head"]
    assert main(argv) == 0
    assert "patch: 100%" in capsys.readouterr().err
    assert main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["kind"] == "patch" and "%|" not in err
    assert main([*argv, "--json", "--progress"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["kind"] == "patch" and "patch: 100%" in err


def test_tasks_writes_an_ioi_dataset_with_roles(tmp_path, capsys):
    out = tmp_path / "ioi.jsonl"
    assert (
        main(
            [
                "tasks",
                "ioi",
                "--model",
                "random:llama-tiny",
                "--n",
                "6",
                "--templates",
                "0,1",
                "--corruption",
                "abc",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    from causalscan.data.pairs import Dataset

    ds = Dataset.from_jsonl(out)
    assert len(ds) == 6 and ds.roles == ("IO", "S1", "S2", "END")
    assert {r["template"] for r in ds.records} == {0, 1}
    assert main(["tasks", "ioi", "--model", "random:llama-tiny", "--templates", "9"]) == 2
    assert "field 'templates'" in capsys.readouterr().err


def test_tasks_greater_than_on_a_tokenizer_without_its_words_exits_2(capsys):
    assert main(["tasks", "greater_than", "--model", "random:llama-tiny", "--n", "2"]) == 2
    assert "no greater-than noun is one token" in capsys.readouterr().err
