"""``lm-lightning compare``: runs side by side from their run records and CSV logs (lm_lightning/tracking/compare.py),
and the sweep summary that names the overrides that vary (lm_lightning/tracking/sweep.py).

The runs: a 3-job learning-rate multirun of ``experiment=tiny``, 6 steps each, validated at steps 3 and 6."""

import csv
import json
import re
import shutil
import subprocess

import pytest
from helpers import run_in_process

from lm_lightning.cli.compare import hydra_arguments

LRS = ["0.001", "0.003", "0.01"]
PLOTS = ["val_loss_vs_step.png", "val_loss_vs_tokens.png", "val_loss_vs_flops.png", "train_loss_vs_step.png"]


@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory, corpus_cache):
    """(the sweep's process result, its folder, the jobs' run records in job order)."""
    root = tmp_path_factory.mktemp("lr_sweep")
    proc = run_in_process("train", "-m", "experiment=tiny", "trainer.max_steps=6", "trainer.val_check_interval=3",
                          "trainer.limit_val_batches=1", "sample.max_new_tokens=0", "logger=csv",
                          f"optimizer.lr={','.join(LRS)}", f"hydra.sweep.dir={root / 'sweep'}", cwd=root,
                          cache=corpus_cache)
    records = [json.loads(next((root / "sweep").glob(f"{job}_*/run.json")).read_text()) for job in range(3)]
    return proc, root / "sweep", records


@pytest.fixture(scope="module")
def compared(lr_sweep, corpus_cache):
    """``lm-lightning compare <sweep>``: (its process result, the output folder)."""
    _, sweep, _ = lr_sweep
    return run_in_process("compare", str(sweep), cwd=sweep.parent, cache=corpus_cache), sweep / "compare"


def table(stdout: str) -> list[dict[str, str]]:
    """The printed table's rows as {column: cell} (cells hold no spaces)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run "))
    end = lines.index("", start)
    return [dict(zip(lines[start].split(), line.split())) for line in lines[start + 1:end]]


def test_the_sweep_summary_names_the_overrides_that_vary(lr_sweep):
    proc, sweep, records = lr_sweep
    assert "sweep summary: 3 of 3 jobs finished, 0 failed" in proc.stdout
    assert re.search(r"every job: experiment=tiny trainer.max_steps=6 .*logger=csv$", proc.stdout, re.MULTILINE)
    for job, lr in enumerate(LRS):
        assert re.search(rf"^  #{job} +ok +optimizer.lr={lr}  val/loss ", proc.stdout, re.MULTILINE)
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "optimizer.lr" in line.split() and "val" in line.split())
    for row, lr, record in zip(lines[header + 1:], LRS, records):
        assert row.split()[2] == lr and f"{record['final']['val/loss']:.4f}" in row.split()
    jobs = json.loads((sweep / "summary.json").read_text())
    assert [job["varying"] for job in jobs] == [{"optimizer.lr": lr} for lr in LRS]


def test_compare_tables_the_differing_key_and_the_metrics_of_each_run_record(lr_sweep, compared):
    _, _, records = lr_sweep
    proc, out = compared
    rows = table(proc.stdout)
    assert "differing config keys: optimizer.lr\n" in proc.stdout  # not the checkpoint or log folders of each run
    assert [row["run"] for row in rows] == ["#0", "#1", "#2"]
    for row, record in zip(rows, records):
        assert float(row["optimizer.lr"]) == record["config"]["optimizer"]["lr"]
        assert row["final/val/loss"] == f"{record['final']['val/loss']:.4f}"
        assert row["best/val/loss"] == f"{record['best']['val/loss']:.4f}"
        assert row["params"] == f"{record['parameters']['total']:,}" == "27,968"
        assert row["tokens"] == f"{record['tokens_trained']:,}" == "1,536"  # 6 steps x 8 windows x 32 characters
        assert float(row["flops"]) == pytest.approx(record["training_flops"], rel=1e-2)
        assert row["status"] == "finished" and row["steps"] == "6"
    with open(out / "compare.csv", newline="") as f:  # full precision
        written = list(csv.DictReader(f))
    assert [float(row["final/val/loss"]) for row in written] == [r["final"]["val/loss"] for r in records]
    assert [float(row["optimizer.lr"]) for row in written] == [float(lr) for lr in LRS]
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"plot:   {out / name}" in proc.stdout
    report = (out / "compare.html").read_text()
    assert report.count('src="data:image/png;base64,') == len(PLOTS) and "http" not in report
    assert f"report: {out / 'compare.html'}" in proc.stdout


def test_sort_and_filter_choose_and_order_the_rows(lr_sweep, tmp_path, corpus_cache):
    _, sweep, records = lr_sweep
    proc = run_in_process("compare", str(sweep), "sort=-final/val/loss", "filter=optimizer.lr<0.01",
                          "filter=status==finished", f"out_dir={tmp_path}", cwd=tmp_path, cache=corpus_cache)
    rows = table(proc.stdout)
    kept = sorted(records[:2], key=lambda r: -r["final"]["val/loss"])
    assert [row["final/val/loss"] for row in rows] == [f"{r['final']['val/loss']:.4f}" for r in kept]
    assert proc.stdout.startswith("2 runs of 3 (filter: optimizer.lr<0.01 and status==finished)")
    assert len((tmp_path / "compare.csv").read_text().splitlines()) == 1 + 2


@pytest.mark.bad_input
@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere"], "compare: {tmp}/nowhere does not exist"),
    (["{tmp}"], "compare: no run.json in {tmp}: name run folders"),
    (["{sweep}", "filter=lr<1"], "compare: filter key 'lr' is neither a config key of the runs nor one of run, status"),
    (["{sweep}", "filter=optimizer.lr"], "compare: cannot read filter 'optimizer.lr'"),
    ([], "compare: no runs given"),
])
def test_bad_input_ends_with_one_error_line(lr_sweep, tmp_path, corpus_cache, args, message):
    sweep = lr_sweep[1]
    fill = {"tmp": tmp_path, "sweep": sweep}
    proc = run_in_process("compare", *[arg.format(**fill) for arg in args], cwd=tmp_path, cache=corpus_cache,
                          check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith(f"error: {message.format(**fill)}"), \
        proc.stderr[-2000:]


def test_bare_paths_become_runs_and_filters_are_quoted_for_hydra(tmp_path):
    job = tmp_path / "0_optimizer.lr=0.01,seed=1"  # a job folder's name holds '=' and ','
    job.mkdir()
    assert hydra_arguments([str(job), f"{tmp_path}/*", "sort=seed", "filter=optimizer.lr<0.01", "filter=seed==1",
                            "--cfg", "job"]) == [
        "sort=seed", "--cfg", "job", f"runs=['{job}','{tmp_path}/*']", "filter=['optimizer.lr<0.01','seed==1']"]


CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
# after the load event: each image's naturalWidth (0 when a data URI did not decode) into the DOM that is dumped
MARK_LOADED = """<script>window.addEventListener("load", () => { for (const img of document.images)
  img.setAttribute("data-loaded", String(img.complete && img.naturalWidth > 0)); });</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install -y chromium)")
def test_the_html_report_renders_its_rows_and_every_plot_in_headless_chromium(lr_sweep, compared, tmp_path):
    _, _, records = lr_sweep
    report = tmp_path / "report.html"
    report.write_text((compared[1] / "compare.html").read_text().replace("</body>", MARK_LOADED))
    browser = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000"]
    dom = subprocess.run([*browser, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    rows = re.findall(r'<tr data-run="(#\d)"( class="best")?>(.*?)</tr>', dom)
    assert [run for run, _, _ in rows] == ["#0", "#1", "#2"]
    for (_, best, cells), record in zip(rows, records):
        assert f"<td>{record['final']['val/loss']:.4f}</td>" in cells
        assert bool(best) == (record["final"]["val/loss"] == min(r["final"]["val/loss"] for r in records))
    assert re.findall(r'<img [^>]*data-loaded="(\w+)"', dom) == ["true"] * len(PLOTS)
    screenshot = tmp_path / "report.png"
    subprocess.run([*browser, "--window-size=1400,1100", f"--screenshot={screenshot}", report.as_uri()],
                   capture_output=True, timeout=60, check=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
