"""Benchmark: the dashboard in a real browser, against the screening pipeline it wraps.

Run: ``python bench/bench_dashboard.py [--screenings 1000] [--repeat 3]``

Measured in this one run (Playwright + Debian's chromium against ``streamlit run`` on
loopback):

1. **Upload to result**: simulated demo scans (97x115x97x300 ``.nii.gz``, one per run: a scan
   belongs to one participant) are attached to the Screen page's uploader; once the upload
   has finished, the clock runs from the click on "Screen participant" until the result card
   (participant heading and probability) is painted. Both ends are taken inside the page
   (a capturing click listener and a MutationObserver, the card's time read two animation
   frames after it is in the document, i.e. after the frame that paints it): Playwright's own
   wait polls with a back-off that reaches 500 ms, so the moment it reports is late by 0-0.5 s
   (measured here: 0.25 s on average), which the in-page clock does not count.
   Reference: ``screening.screen()`` on the same file, in this process, same run; once in a
   block before the dashboard runs, and once just before each dashboard run on the same scan
   (the paired overhead: on this shared VM the same script's times drift by a second over
   minutes, so only a pair measured back to back sees one machine state). Target (issue
   "performance, round 2"): at most the screen figure + 1 s.
2. **Page switches with a seeded cohort**: a database seeded with ``--screenings`` screenings
   (426 region attributions each, written through the repository in one bulk transaction);
   the clock runs from the click on a navigation link until that page's last element is
   drawn and Streamlit reports it is no longer running. Target: under 1 s.

Where the upload-to-result time goes is printed beside it, from the same run: the pipeline's
stage timings as the dashboard's worker stored them (against ``screen()``'s own in this
process), the upload's copy to the staging folder (``io.write_upload`` of the same file) and
the rest (the page's rerun, the pipe, drawing the card), and the CPU seconds the server, its
worker, the browser and Playwright's driver used meanwhile (``psutil``: who competes for the
cores). ``--worker-threads 1,2`` measures the
dashboard once per worker thread count (``FMMTC_WORKER_THREADS``; default: the worker's own
rule). ``--pin`` puts the browser on CPU 0 and the server with its worker on CPU 1 (Linux
``taskset``), the layout of a deployment where the browser is on another computer; the paired
reference then runs on CPU 1 with one torch thread, as the worker does, so the paired overhead
is the dashboard's own (server, pipe, page, drawing) without the browser's share of the cores.
"""

from __future__ import annotations

import argparse
import atexit
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def seed(url: str, n: int, model) -> None:
    """``n`` screenings of ``n`` participants, with region and connection attributions."""
    from sqlalchemy import insert

    from fmmtc_core.atlas import load_atlas
    from fmmtc_core.store import open_database, session_scope
    from fmmtc_core.store import repository as repo
    from fmmtc_core.store.models import (
        ConnectionAttribution,
        Participant,
        RegionAttribution,
        Scan,
        Screening,
    )

    engine = open_database(url)
    atlas = load_atlas(model.atlas)
    rng = np.random.default_rng(0)
    r = atlas.n_regions
    series = repo.encode_series(rng.standard_normal((200, r)).astype(np.float32))
    with session_scope(engine, write=True) as s:
        mv = repo.get_or_create_model_version(s, model.name, model.weights_sha256, model.card,
                                              actor="bench")
        s.execute(insert(Participant), [
            {"pseudonym": f"BENCH-{i:05d}", "site": f"site{i % 4 + 1}",
             "drug": ("drug_a", "drug_b")[i % 2], "simulated": True} for i in range(n)])
        pids = dict(s.execute(Participant.__table__.select().with_only_columns(
            Participant.pseudonym, Participant.id)).all())
        s.execute(insert(Scan), [
            {"sha256": f"{i:064x}", "participant_id": pids[f"BENCH-{i:05d}"], "kind": "table",
             "shape": [200, r], "tr": 2.0, "atlas": atlas.name, "qc_verdict": "pass",
             "qc": {"reasons": []}, "n_volumes": 200, "n_regions": r, "series": series}
            for i in range(n)])
        sids = dict(s.execute(Scan.__table__.select().with_only_columns(Scan.sha256,
                                                                        Scan.id)).all())
        p = rng.beta(2, 2, n)
        rows = []
        for i in range(n):
            lo, hi = max(0.0, p[i] - 0.15), min(1.0, p[i] + 0.15)
            rows.append({
                "participant_id": pids[f"BENCH-{i:05d}"], "scan_id": sids[f"{i:064x}"],
                "model_version_id": mv.id, "inputs_sha256": f"{i:064x}",
                "probability": float(p[i]), "band_low": lo, "band_high": hi,
                "fold_probabilities": [float(p[i])] * 5,
                "decision": "likely responder" if lo >= 0.6 else
                ("likely non-responder" if hi <= 0.4 else "uncertain"),
                "thresholds": {"responder": 0.6, "non_responder": 0.4},
                "share_ts": 0.01, "share_fc": 0.99, "ig_gap": 0.005, "ig_steps": 16,
                "explanation": {"networks": {"Frontal": {"ts": 0.0, "fc": 0.1, "total": 0.1}}},
                "runtime_s": 4.0, "stage_seconds": {}, "software_version": "bench",
                "operator": "bench"})
        s.execute(insert(Screening), rows)
        screening_ids = [x[0] for x in s.execute(Screening.__table__.select().with_only_columns(
            Screening.id))]
        for sid in screening_ids:
            scores = rng.standard_normal(r) * 0.1
            s.execute(insert(RegionAttribution), [
                {"screening_id": sid, "region_index": k, "label": int(atlas.labels[k]),
                 "name": atlas.names[k], "network": atlas.groups[k], "ts": 0.0,
                 "fc": float(scores[k]), "total": float(scores[k])} for k in range(r)])
            s.execute(insert(ConnectionAttribution), [
                {"screening_id": sid, "rank": k, "region_i": k, "region_j": k + 1,
                 "label_i": int(atlas.labels[k]), "label_j": int(atlas.labels[k + 1]),
                 "score": 0.01} for k in range(20)])


def start_server(env: dict, cpus: str | None = None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pin = ["taskset", "-c", cpus] if cpus else []
    proc = subprocess.Popen(
        [*pin, sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless",
         "true", "--server.address", "127.0.0.1", "--server.port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("streamlit did not start")


def idle(pg) -> None:
    """Wait until Streamlit says the script run is over."""
    pg.wait_for_function(
        "() => !document.querySelector('[data-testid=stStatusWidget]')"
        " || !document.querySelector('[data-testid=stStatusWidget]').innerText"
        ".includes('Running')", timeout=120_000)
    pg.wait_for_timeout(50)
    pg.wait_for_function(
        "() => !document.querySelector('[data-testid=stStatusWidget]')"
        " || !document.querySelector('[data-testid=stStatusWidget]').innerText"
        ".includes('Running')", timeout=120_000)


def stored_stages(url: str, prefix: str) -> list[dict]:
    """Stage seconds of the stored screenings whose participant starts with ``prefix``."""
    from sqlalchemy import select

    from fmmtc_core.store import open_database, session_scope
    from fmmtc_core.store.models import Participant, Screening

    engine = open_database(url)
    try:
        with session_scope(engine) as s:
            rows = s.execute(select(Participant.pseudonym, Screening.stage_seconds)
                             .join(Screening, Screening.participant_id == Participant.id)
                             .where(Participant.pseudonym.startswith(prefix))
                             .order_by(Screening.id)).all()
    finally:
        engine.dispose()
    return [dict(stages) for _, stages in rows]


def median_stages(runs: list[dict]) -> dict:
    keys = list(runs[0])
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}


def cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of the Streamlit server, its worker process(es), the
    browser's processes and Playwright's driver: who used the cores during a screening."""
    import psutil

    def used(procs) -> float:
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:  # ended meanwhile
                pass
        return total

    server = psutil.Process(server_pid)
    mine = psutil.Process().children(recursive=True)
    try:
        workers = server.children(recursive=True)
    except psutil.Error:
        workers = []
    def name(p) -> str:
        try:
            return p.name()
        except psutil.Error:
            return ""
    return {"server": used([server]), "worker": used(workers),
            "browser": used([p for p in mine if "chrom" in name(p)]),
            "driver": used([p for p in mine if name(p) == "node"])}


#: Installed in the page before the click: records (``performance.now()``, ms) the click, the
#: first frame after the one that paints the card's heading and probability, and the same for
#: the card's glass brain (its first image, drawn after the decision).
WATCH_CARD = """(heading) => {
  window.__fmmtcClick = null;
  window.__fmmtcShown = null;
  document.addEventListener("click", () => {
    if (window.__fmmtcClick === null) window.__fmmtcClick = performance.now();
  }, {capture: true});
  window.__fmmtcFigure = null;
  const figure = new MutationObserver(() => {
    const img = document.querySelector("[data-testid=stImage] img");
    if (!img) return;
    figure.disconnect();
    const painted = () => requestAnimationFrame(() => requestAnimationFrame(() => {
      window.__fmmtcFigure = performance.now();
    }));
    if (img.complete) painted(); else img.addEventListener("load", painted, {once: true});
  });
  figure.observe(document.body, {childList: true, subtree: true});
  let done = false;
  const there = () => {
    const h = [...document.querySelectorAll("h1, h2, h3, h4")].some(
      (e) => e.textContent.trim() === heading);
    const p = [...document.querySelectorAll("[data-testid=stMetricLabel]")].some(
      (e) => e.textContent.includes("Responder probability"));
    return h && p;
  };
  const observer = new MutationObserver(() => {
    if (done || !there()) return;
    done = true;
    observer.disconnect();
    requestAnimationFrame(() => requestAnimationFrame(() => {
      window.__fmmtcShown = performance.now();
    }));
  });
  observer.observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def upload_run(browser, scans, env, args, label: str, pin: bool, reference=None
               ) -> tuple[list[float], list[dict], list[dict], list[float], float, list[float]]:
    """Upload-to-result times (the first run warms up; the page's own clock, see
    :data:`WATCH_CARD`), the worker's stored stage seconds,
    the CPU seconds each process group used in each timed run and, with ``reference``
    (``reference(i)`` -> seconds of ``screen()`` on scan ``i`` in this process), the
    reference timed just before each dashboard run on the same scan (paired: both see the
    machine in the same state), and the first run's time (the server had just started: the
    worker process starts and loads the model during it)."""
    proc, url = start_server(env, cpus="1" if pin else None)
    times, cpu, paired, figures = [], [], [], []
    try:
        for i in range(args.repeat + 1):  # the first run warms the server's caches
            if i and reference is not None:
                paired.append(reference(i))
            pg = browser.new_page(viewport={"width": 1400, "height": 1600})
            pg.set_default_timeout(300_000)
            pg.goto(url)
            pg.get_by_role("heading", name="Screen a participant").wait_for()
            idle(pg)
            pg.get_by_label("Study pseudonym").fill(f"UI{label}-{i}")
            pg.locator("[data-testid=stFileUploader]").filter(has_text="Scan (").locator(
                "input[type=file]").set_input_files(str(scans[i]))  # not the sidecar's
            pg.locator("[data-testid=stFileChip]").first.wait_for()
            pg.locator("[data-testid=stFileChipIconSpinner]").wait_for(state="detached")
            pg.evaluate(WATCH_CARD, f"Participant UI{label}-{i}")
            before = cpu_seconds(proc.pid)
            pg.get_by_role("button", name="Screen participant").click()
            try:
                pg.get_by_role("heading", name=f"Participant UI{label}-{i}").wait_for()
            except Exception:  # say what the page shows instead of the result
                shot = Path(tempfile.gettempdir()) / f"bench-dashboard-UI{label}-{i}.png"
                pg.screenshot(path=str(shot), full_page=True)
                text = pg.locator("[data-testid=stMain]").inner_text(timeout=10_000)
                raise SystemExit(f"no result for UI{label}-{i} (screenshot {shot}); the page "
                                 f"shows:\n{text[:2000]}") from None
            pg.get_by_text("Responder probability").first.wait_for()
            pg.wait_for_function("() => window.__fmmtcShown !== null")
            after = cpu_seconds(proc.pid)
            pg.wait_for_function("() => window.__fmmtcFigure !== null")
            clicked, shown, drawn = pg.evaluate(
                "() => [window.__fmmtcClick, window.__fmmtcShown, window.__fmmtcFigure]")
            if not i:
                first = (shown - clicked) / 1000
            else:
                times.append((shown - clicked) / 1000)
                figures.append((drawn - clicked) / 1000)
                cpu.append({k: after[k] - before[k] for k in after})
            pg.close()
    finally:
        proc.terminate()
        proc.wait()
    stages = stored_stages(env["FMMTC_DATABASE_URL"], f"UI{label}-")[1:]
    return times, stages, cpu, paired, first, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--screenings", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--worker-threads", default="",
                        help="comma-separated worker thread counts to measure (default: the "
                             "worker's own rule, once)")
    parser.add_argument("--pin", action="store_true",
                        help="browser on CPU 0, server and worker on CPU 1 (taskset)")
    parser.add_argument("--nice-browser", action="store_true",
                        help="run the browser at the lowest CPU priority (nice 19): it gets the "
                             "cycles the server and the worker leave, as when it runs on the "
                             "user's own computer, without taking a core from the worker")
    parser.add_argument("--skip-switches", action="store_true",
                        help="measure only upload to result")
    args = parser.parse_args()
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("--pin needs two CPUs")
    thread_counts = [t.strip() for t in args.worker_threads.split(",") if t.strip()] or [""]

    from playwright.sync_api import sync_playwright

    from fmmtc_core.io import write_upload
    from fmmtc_core.screening import screen
    from fmmtc_core.simulate import demo_scan
    from fmmtc_core.store import open_database
    from fmmtc_core.models.ensemble import load_model

    # distinct scans of the same size: a scan belongs to one participant, so each run needs its own
    scans = [demo_scan(seed=7 + i)[0] for i in range(args.repeat + 1)]
    bold = scans[0]
    model = load_model()
    tmp = Path(tempfile.mkdtemp(prefix="fmmtc-bench-ui-"))
    atexit.register(shutil.rmtree, tmp, True)

    # 1. the reference: screen() in this process, same file (after a warm-up)
    ref_engine = open_database(f"sqlite:///{tmp / 'ref.db'}")
    screen(scans[0], "REF-0", model, ref_engine)
    ref, ref_stages = [], []
    for i in range(1, args.repeat + 1):
        t0 = time.perf_counter()
        got = screen(scans[i], f"REF-{i}", model, ref_engine)
        ref.append(time.perf_counter() - t0)
        ref_stages.append(got.summary.stage_seconds)
    ref_s = statistics.median(ref)

    import torch

    def paired_reference(label: str):
        """``screen()`` on scan ``i`` in this process, into a database of its own (a scan
        already in a database would be reused, not screened). With ``--pin`` it runs on the
        worker's core (CPU 1) with the worker's one torch thread: like for like with the
        dashboard whose browser has the other core, so the difference is the dashboard's own
        cost (server, pipe, page) and not the browser's share of the machine."""
        engine = open_database(f"sqlite:///{tmp / f'ref-paired-{label}.db'}")

        def run(i: int) -> float:
            mask, threads = os.sched_getaffinity(0), torch.get_num_threads()
            if args.pin:
                os.sched_setaffinity(0, {1})
                torch.set_num_threads(1)
            try:
                t0 = time.perf_counter()
                screen(scans[i], f"PAIRED-{i}", model, engine)
                return time.perf_counter() - t0
            finally:
                os.sched_setaffinity(0, mask)
                torch.set_num_threads(threads)
        return run

    ref_threads = torch.get_num_threads()
    # the upload's copy to the staging folder, as the page makes it (same file, same place:
    # in memory when there is room; the folder is removed at once, so no dirty pages of it
    # are left for the disk to write back during the dashboard's runs)
    from fmmtc_app.uploads import staging_folder

    staging = []
    for i in range(1, args.repeat + 1):
        data = io.BytesIO(scans[i].read_bytes())
        with staging_folder(size=len(data.getbuffer())) as folder:
            t0 = time.perf_counter()
            write_upload(data, scans[i].name, folder)
            staging.append(time.perf_counter() - t0)
    staging_s = statistics.median(staging)
    os.sync()  # the demo scans just written: their write-back is not the dashboard's cost

    seeded = f"sqlite:///{tmp / 'seeded.db'}"
    t0 = time.perf_counter()
    if not args.skip_switches:
        seed(seeded, args.screenings, model)
    seed_s = time.perf_counter() - t0

    seeded_env = {**os.environ, "FMMTC_DATABASE_URL": seeded}
    chromium = "/usr/bin/chromium"
    if args.pin:
        wrapper = tmp / "chromium-cpu0"
        wrapper.write_text(f'#!/bin/sh\nexec taskset -c 0 {chromium} "$@"\n')
        wrapper.chmod(0o755)
        chromium = str(wrapper)
    elif args.nice_browser:
        wrapper = tmp / "chromium-nice"
        wrapper.write_text(f'#!/bin/sh\nexec nice -n 19 {chromium} "$@"\n')
        wrapper.chmod(0o755)
        chromium = str(wrapper)
    launch = dict(executable_path=chromium,
                  args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
    uploads: dict[str, tuple] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(**launch)
        # 2. upload to result, once per worker thread count
        for j, threads in enumerate(thread_counts):
            env = {**os.environ, "FMMTC_DATABASE_URL": f"sqlite:///{tmp / f'ui{j}.db'}"}
            env.pop("FMMTC_WORKER_THREADS", None)
            if threads:
                env["FMMTC_WORKER_THREADS"] = threads
            uploads[threads] = upload_run(browser, scans, env, args, str(j), args.pin,
                                          reference=paired_reference(str(j)))
        # 3. page switches on the seeded database
        if args.skip_switches:
            browser.close()
            return report(args, bold, model, ref_s, ref_stages, ref_threads, staging_s,
                          uploads, None, seed_s)
        proc, url = start_server(seeded_env, cpus="1" if args.pin else None)
        marks = {"Cohort review": ("heading", "Enrolment at a threshold"),
                 "Attribution explorer": ("text", "IG gap"),
                 "Model": ("heading", "Cross-validation metrics (out of fold)"),
                 "Screen participant": ("heading", "Screen a participant")}
        switch: dict[str, list[float]] = {k: [] for k in marks}
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 1600})
            pg.set_default_timeout(120_000)
            pg.goto(url)
            pg.get_by_role("heading", name="Screen a participant").wait_for()
            idle(pg)
            for rep in range(args.repeat + 1):  # the first round warms the caches
                for link, (kind, text) in marks.items():
                    t0 = time.perf_counter()
                    pg.get_by_role("link", name=link).click()
                    target = (pg.get_by_role("heading", name=text) if kind == "heading"
                              else pg.get_by_text(text).first)
                    target.wait_for()
                    idle(pg)
                    if rep:
                        switch[link].append(time.perf_counter() - t0)
        finally:
            proc.terminate()
            proc.wait()
        browser.close()

    report(args, bold, model, ref_s, ref_stages, ref_threads, staging_s, uploads, switch, seed_s)


def report(args, bold, model, ref_s, ref_stages, ref_threads, staging_s, uploads, switch,
           seed_s) -> None:
    from fmmtc_app.worker import worker_threads

    print(f"scan {bold.name} ({bold.stat().st_size / 1e6:.0f} MB), model {model.name}, "
          f"median of {args.repeat}; {len(os.sched_getaffinity(0))} CPUs"
          + ("; browser pinned to CPU 0, server and worker to CPU 1" if args.pin else "")
          + ("; browser at nice 19" if args.nice_browser else "")
          + f"; load average {os.getloadavg()[0]:.1f}")
    print("\n1. upload finished -> result card")
    ref_st = median_stages(ref_stages)
    print(f"   screen() in process (reference, {ref_threads} torch threads): {ref_s:6.2f} s "
          f"(stages {sum(ref_st.values()):.2f} s)")
    for threads, (times, stages, cpu, paired, first, figures) in uploads.items():
        ui_s = statistics.median(times)
        n = threads or f"{worker_threads() if not args.pin else 1} (default)"
        st_ = median_stages(stages)
        pipe = sum(st_.values())
        print(f"   dashboard, worker with {n} threads: {ui_s:6.2f} s   (overhead "
              f"{ui_s - ref_s:+.2f} s; target <= +1.00 s)")
        if paired:
            diffs = [d - r for d, r in zip(times, paired)]
            where = " on CPU 1 with 1 torch thread, as the worker" if args.pin else ""
            print(f"      paired with screen() run{where} just before each dashboard run, same "
                  f"scan: "
                  f"median overhead {statistics.median(diffs):+.2f} s (per run "
                  + ", ".join(f"{d:.2f}-{r:.2f}" for d, r in zip(times, paired))
                  + "; target <= +1.00 s)")
        outside = ref_s - sum(ref_st.values())  # hashing the inputs, the database lookups
        print(f"      pipeline in the worker {pipe:.2f} s (in process {sum(ref_st.values()):.2f}"
              f" s), upload copy {staging_s:.2f} s, screen() outside its stages {outside:.2f} s "
              f"(in process), rest (rerun, pipe, drawing) {ui_s - pipe - staging_s - outside:.2f}"
              " s")
        print("      stage      worker   in process")
        for k in ref_st:
            print(f"      {k:<10} {st_.get(k, 0.0):6.2f}   {ref_st[k]:6.2f}")
        used = {k: statistics.median(c[k] for c in cpu) for k in cpu[0]}
        print(f"      CPU seconds in that time: " + ", ".join(
            f"{k} {v:.2f}" for k, v in used.items())
            + f" (sum {sum(used.values()):.2f} of {len(os.sched_getaffinity(0)) * ui_s:.2f} "
              "available)")
        print(f"      the card's glass brain painted {statistics.median(figures):.2f} s after the "
              "click (median; drawn after the decision)")
        print(f"      first screening after the server started (untimed warm-up above; the "
              f"worker process starts and loads the model): {first:.2f} s")
    if switch is None:
        return
    print(f"\n2. page switches, database seeded with {args.screenings} screenings "
          f"({seed_s:.0f} s to seed)")
    for link, t in switch.items():
        print(f"   {link:<22} {statistics.median(t):6.2f} s   (max {max(t):.2f} s; target < 1 s)")


if __name__ == "__main__":
    main()
