"""``fastvit-reduce sweep CONFIG...``: run one training job per config and compare them.

    fastvit-reduce sweep rn_configs/{baseline,thin,shallow,grouped}.yaml --gpus 0,1,2,3 --out runs/
    fastvit-reduce sweep rn_configs/sample/{baseline,thin}.yaml --out demo_out/runs  # CPU: one by one
    fastvit-reduce sweep --paired --seeds 1,2,3 rn_configs/sample/{baseline,thin}.yaml --out demo_out/seeds
    fastvit-reduce sweep rn_configs/{thin,grouped}.yaml --slurm --nodes 2 --gpus-per-run 8 --out runs/

Each config is its own ``torchrun`` job (``python -m torch.distributed.run ... -m fastvit_reduce.cli
train --config C --logging.folder=OUT --logging.experiment=<config stem> [--set overrides]``),
so a run is exactly what you would get by hand, and its folder is ``OUT/<config stem>/``.

* GPUs: with ``--gpus 0,1,2,3 --gpus-per-run K`` it keeps G/K jobs running at once, each with its
  own ``CUDA_VISIBLE_DEVICES`` and its own rendezvous port. One GPU per job is the default
  (ffcv-imagenet measured its ResNet tables that way). Without ``--gpus``: one job at a time,
  one process each, on whatever device the config picks (``training.device``).
* Output of each job goes to ``OUT/logs/<stem>.log`` (and to the screen when jobs run one by one).
* A failed job does not stop the sweep; it is listed with its log. The exit code is 1 if any
  run did not finish, 124 if the sweep itself was interrupted (SIGINT/SIGTERM are passed on to
  the jobs, which save ``last.pt``), else 0.
* Re-running the same command skips runs whose ``final.json`` says ``completed`` when the config
  and ``--set`` resolve to the same settings (the trainer's own judge, ``runs.run_changes``);
  others are launched again and resume from their ``last.pt``. After a config change the trainer
  refuses the old run folder, naming the changed keys; delete it to redo.
* ``--paired``: all configs train in ONE trainer process, stepping in turn on each batch, which is
  decoded and augmented once (``train.py --config A --pair-with B C``). The comparison is then
  between strategies on identical data; ``report`` adds a paired-difference table.
* ``--seeds 1,2,3``: every job once per seed (``--training.seed=S``), its runs in
  ``OUT/seed_<S>/<name>/`` (names unchanged, so ``report`` matches a variant's runs by name and
  seed) and its log in ``OUT/logs/<job>_seed<S>.log``; ``report`` then gives each variant's
  difference from the baseline with a 95 % interval over the seeds.
* ``--cpu-slots N`` (CPU): N jobs at once, each pinned to its own 1/N of the cores (the trainer
  sizes its threads from that). With ``--paired`` the pair is split over N processes
  (``--pair-part I/N``), each decoding the same batches: one small ViT's step does not use more
  than about one core (docs/results/speed.md), so on a CPU this is how a paired sweep fills the machine.
  Before launching, each job's decode threads are sized (``data.num_workers: 0`` = one per core
  of the job, printed on its start line); a config asking for more than numba allows a job is
  refused, naming the value that works.
* At the end it writes ``OUT/sweep_summary.{csv,md,png}`` (``fastvit_reduce.report``): this
  sweep's runs in config order, then any other run folders already in ``OUT``.

Slurm (``--slurm``): instead of running, writes ``OUT/slurm/<stem>.sbatch`` per config — one
``srun`` task per node launching ``torchrun --nnodes=$SLURM_NNODES --nproc_per_node=K`` with a c10d
rendezvous on the first node — and submits each with ``sbatch`` when it is on PATH (else prints the
scripts' paths). 180 s before the time limit Slurm sends SIGUSR1 to the script
(``--signal=B:USR1@180``), which sends SIGTERM to the job steps (torchrun passes it on; the
trainer saves ``last.pt`` and exits) and requeues the job, which then resumes from ``last.pt``.
Collect results with ``fastvit-reduce report OUT``.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastvit_reduce import report, runs
from fastvit_reduce.config import ConfigError, UsageError
from fastvit_reduce.procs import launch, split_cores
from fastvit_reduce.slurm import submit, write_sbatch


class SweepError(UsageError):
    """Bad sweep arguments (reported as ``error: ...``, exit code 2, before any job starts)."""


@dataclass
class Job:
    """One trainer process of the sweep (one config, or K paired configs) and what became of it."""
    config: Path
    name: str                          # config stem = logging.experiment = run folder name
    run_dir: Path
    log: Path
    pair: list[Path] = field(default_factory=list)       # --paired: the other configs
    pair_dirs: list[Path] = field(default_factory=list)  # --paired: their run folders
    part: tuple[int, int] | None = None                  # --paired --cpu-slots N: (i, N)
    seed: int | None = None                              # --seeds: this job's training.seed
    status: str = "not started"
    returncode: int | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    logf: object = field(default=None, repr=False)  # open log file while running
    gpus: list[str] = field(default_factory=list)
    cpus: list[int] = field(default_factory=list)        # --cpu-slots: the cores it is pinned to
    decode_threads: int | None = None                    # ffcv decode threads each of its processes runs
    port: int | None = None
    start: float = 0.0
    log_offset: int = 0                # where this attempt's output starts in the (appended) log


# ----------------------------------------------------------------------------- building commands
def is_complete(run_dir: Path) -> bool:
    """True when the trainer wrote ``final.json`` with ``completed: true``."""
    try:
        return runs.RunFolder(run_dir).is_complete()
    except runs.RunFolderError:
        return False


def run_dirs(job: Job) -> list[Path]:
    return [job.run_dir, *job.pair_dirs]


def job_complete(job: Job) -> bool:
    return all(is_complete(d) for d in run_dirs(job))


def resolved_configs(job: Job, out: Path, overrides: list[str]) -> list[dict] | None:
    """The trainer's resolved config of every run of ``job``, exactly as the command would load it;
    None when a config does not load (the trainer will say why)."""
    from fastvit_reduce.train import resolve_variants
    try:
        return [cfg for cfg, _ in resolve_variants(train_args(job, out, overrides))]
    except ConfigError:
        return None


def can_skip(job: Job, out: Path, overrides: list[str]) -> bool:
    """A job is skipped when all its runs completed with the configuration it would run now.
    The judge of "same run" is the trainer's (``runs.run_changes``), nothing of the sweep's."""
    if not job_complete(job):
        return False
    cfgs = resolved_configs(job, out, overrides)
    if cfgs is None:
        return False
    from fastvit_reduce.data.betons import data_fingerprints
    for cfg, d in zip(cfgs, run_dirs(job)):
        try:
            params = runs.RunFolder(d).read_params() or {}
        except runs.RunFolderError:
            return False  # the trainer names the damaged file
        if runs.run_changes(params.get("config", {}), params.get("data"), cfg, data_fingerprints(cfg)):
            return False
    return True


def free_port(avoid: set[int]) -> int:
    """A TCP port that is free now and not handed to another running job."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def train_args(job: Job, out: Path, overrides: list[str]) -> list[str]:
    """The trainer's arguments for ``job`` (config, run folder, then the sweep's --set overrides).
    Paired: ``--pair-with`` the other configs (and ``--pair-part I/N`` for one of N processes);
    each run is named after its config file."""
    folder = f"--logging.folder={job.run_dir.parent.resolve()}"  # OUT, or OUT/seed_S with --seeds
    seed = [] if job.seed is None else [f"--training.seed={job.seed}"]
    if job.pair:
        part = [f"--pair-part={job.part[0]}/{job.part[1]}"] if job.part else []
        return (["--config", str(job.config.resolve()), "--pair-with", *(str(c.resolve()) for c in job.pair),
                 *part, folder] + seed + [f"--{kv}" for kv in overrides])
    return ["--config", str(job.config.resolve()), folder,
            f"--logging.experiment={job.run_dir.name}"] + seed + [f"--{kv}" for kv in overrides]


def torchrun_command(job: Job, out: Path, overrides: list[str], nproc: int, port: int) -> list[str]:
    """``python -m torch.distributed.run`` for one single-node job on a private rendezvous port."""
    # why -m fastvit_reduce.cli: works for an installed package too, where the repo's train.py is absent
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={job.name}",
            "-m", "fastvit_reduce.cli", "train"] + train_args(job, out, overrides)


def attempt_output(job: Job) -> list[str]:
    """Lines this attempt wrote to the job's log (earlier attempts are above ``log_offset``)."""
    if not job.log.is_file():
        return []
    with open(job.log, "rb") as f:
        f.seek(job.log_offset)
        text = f.read().decode(errors="replace")
    return [t.strip() for t in text.replace("\r", "\n").splitlines()]


def last_error_line(lines: list[str]) -> str:
    """The last ``error: ...`` (plus its first detail line) or ``...Error: ...`` line."""
    for i in range(len(lines) - 1, -1, -1):
        text = lines[i]
        if text.startswith("error:"):
            if text.endswith(":") and i + 1 < len(lines):  # "error: configuration error:" + the key
                text += " " + lines[i + 1]
            return text[:200]
        if "Error: " in text and not text.startswith("torch."):
            return text[:200]
    return ""


def trainer_exit_code(lines: list[str], torchrun_code: int | None) -> int | None:
    """The trainer's own exit code: torchrun exits 1 for any failed worker but logs
    ``failed (exitcode: N)``, so 2 (config error) and 124 (preempted) stay visible."""
    for line in reversed(lines):
        m = re.search(r"failed \(exitcode: (-?\d+)\)", line)
        if m:
            return int(m.group(1))
    return torchrun_code


def finish_status(job: Job) -> str:
    """Summary status of a finished job, from its run folder (``final.json``, ``last.pt``) and log."""
    if job_complete(job):
        return "done"
    lines = attempt_output(job)
    code = trainer_exit_code(lines, job.returncode)
    resumable = " — re-run the sweep to resume from last.pt" if (job.run_dir / "last.pt").is_file() else ""
    why = last_error_line(lines)
    what = "preempted" if code == 124 else "failed"
    return f"{what} (exit {code})" + (f": {why}" if why else "") + resumable


# ----------------------------------------------------------------------------- running
class Runner:
    """Starts jobs on free GPU slots (or CPU slots: core sets) and collects their status."""

    def __init__(self, jobs: list[Job], out: Path, overrides: list[str], gpus: list[str],
                 gpus_per_run: int, cpu_sets: list[list[int]] | None = None):
        self.jobs, self.out, self.overrides = jobs, out, overrides
        self.nproc = gpus_per_run if gpus else 1
        # each slot is (GPUs, cores) one job may use; CPU: one slot per core set (no pinning
        # with a single slot: the job gets every core this sweep may use)
        starts = range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)
        cpu_sets = cpu_sets if cpu_sets and len(cpu_sets) > 1 else [[]]
        self.slots = [(gpus[i:i + gpus_per_run], []) for i in starts] if gpus else [([], c) for c in cpu_sets]
        self.stream = len(self.slots) == 1  # one job at a time: show its output live
        self.stopping = False

    def _start(self, job: Job, slot: tuple[list[str], list[int]], busy_ports: set[int]) -> None:
        (job.gpus, job.cpus), job.port = slot, free_port(busy_ports)
        env = dict(os.environ)
        if job.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(job.gpus)
        cmd = torchrun_command(job, self.out, self.overrides, self.nproc, job.port)
        job.log.parent.mkdir(parents=True, exist_ok=True)
        job.log_offset = job.log.stat().st_size if job.log.is_file() else 0
        resuming = " (resuming from last.pt)" if (job.run_dir / "last.pt").is_file() else ""
        where = f"GPU {','.join(job.gpus)}" if job.gpus else \
            f"CPU cores {','.join(map(str, job.cpus))}" if job.cpus else "CPU"
        threads = f", {job.decode_threads} decode thread(s)" if job.decode_threads else ""
        print(f"sweep: start {job.name}{resuming} on {where}{threads} — log {job.log}", flush=True)
        job.logf = open(job.log, "ab")
        job.logf.write(f"\n$ {shlex.join(cmd)}\n".encode())
        job.logf.flush()
        job.proc = launch(cmd, cpus=job.cpus, env=env, stdout=subprocess.PIPE if self.stream else job.logf,
                          stderr=subprocess.STDOUT)
        if self.stopping:  # why: a signal that came while we were starting found no process to stop
            job.proc.send_signal(signal.SIGTERM)
        job.start = time.time()
        job.status = "running"

    def _pump(self, job: Job) -> None:
        """Copy a streamed job's output to the log and the screen until it exits."""
        fd = job.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            job.logf.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()

    def _finish(self, job: Job) -> None:
        job.returncode = job.proc.wait()
        job.logf.close()
        job.status = finish_status(job) if not self.stopping else \
            ("done" if job_complete(job) else "stopped — re-run the sweep to resume")
        print(f"sweep: {job.name}: {job.status} after {time.time() - job.start:.0f} s", flush=True)

    def stop(self, signum, _frame) -> None:
        """On SIGINT/SIGTERM: start no new job and ask running ones to save last.pt and exit."""
        if not self.stopping:
            print(f"sweep: got signal {signum}; stopping the running jobs (they save last.pt)",
                  file=sys.stderr, flush=True)
        self.stopping = True
        for job in self.jobs:
            if job.proc is not None and job.proc.poll() is None:
                job.proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every worker

    def run(self) -> None:
        """Run every job whose status is 'not started'."""
        pending = [j for j in self.jobs if j.status == "not started"]
        running: dict[int, Job] = {}  # slot index -> job
        while (pending and not self.stopping) or running:
            for i, slot in enumerate(self.slots):
                if i not in running and pending and not self.stopping:
                    running[i] = job = pending.pop(0)
                    self._start(job, slot, {j.port for j in running.values() if j.port})
                    if self.stream:
                        self._pump(job)
            for i, job in list(running.items()):
                if job.proc.poll() is not None:
                    self._finish(job)
                    del running[i]
            if running:
                time.sleep(0.5)


def job_cores(cpu_sets: list[list[int]]) -> int:
    """Cores every job of this sweep can count on: the smallest ``--cpu-slots`` set, else all of
    this process's cores (an unpinned job sees them all)."""
    return min(len(c) for c in cpu_sets) if len(cpu_sets) > 1 else len(os.sched_getaffinity(0))


def size_decode_threads(jobs: list[Job], out: Path, overrides: list[str], cores: int, slots: int) -> None:
    """Before anything is launched: the ffcv decode threads each job will run (``data.num_workers``,
    0 = one per core of the job), recorded on the job for the start line; ``SweepError`` naming
    the key and a value that works when a config asks for more than numba allows a job (numba
    refuses more threads than NUMBA_NUM_THREADS, by default the cores the process may use), which
    would otherwise fail every job after its start-up."""
    env = os.environ.get("NUMBA_NUM_THREADS", "")
    limit = int(env) if env.isdigit() and int(env) > 0 else cores
    for job in jobs:
        cfgs = resolved_configs(job, out, overrides)
        if not cfgs:
            continue  # the trainer names the config error itself
        asked = cfgs[0]["data.num_workers"]  # paired variants agree on it (it shapes the batches' source)
        if asked > limit:
            split = (f"--cpu-slots {slots} gives each job {cores} core(s)" if slots > 1
                     else f"each job may use {cores} core(s)")
            raise SweepError(f"data.num_workers={asked} ({job.config}) asks for {asked} decode threads, but {split} "
                             f"and numba allows at most {limit} thread(s) there; use --set data.num_workers={limit} "
                             f"(or --set data.num_workers=0: one per core of each job)")
        job.decode_threads = asked or min(cores, limit)


# ----------------------------------------------------------------------------- slurm
# ----------------------------------------------------------------------------- summary and CLI
def summary_rows(jobs: list[Job], out: Path) -> list[dict]:
    """Report rows: this sweep's jobs in config order (a job without a readable run folder gets a
    bare row with its status and log), then any other run folders already in ``out``."""
    rows = []
    for job in jobs:
        for d in run_dirs(job):
            try:
                row = report.load_run(d)
            except report.ReportError:
                row = {c: None for c in report.CSV_COLUMNS}
                row.update(experiment=d.name, knobs="", run_dir=str(d))
            if job.status != "done" or row["status"] != "done":
                row["status"] = job.status
            row["log"] = str(job.log) if job.log.is_file() else ""
            rows.append(row)
    ours = {d.resolve() for job in jobs for d in run_dirs(job)}
    for run in report.runs_below(out):
        if run.resolve() not in ours:
            try:
                rows.append(report.load_run(run))
            except report.ReportError:
                continue  # a folder the trainer left empty: nothing to compare
    return rows


def parse_gpus(text: str | None) -> list[str]:
    """``'0,1,2,3'`` -> ['0', '1', '2', '3'] (ids as CUDA_VISIBLE_DEVICES takes them)."""
    if not text:
        return []
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if len(set(gpus)) != len(gpus):
        raise SweepError(f"--gpus lists a GPU twice: {text}")
    return gpus


def refuse_control_chars(what: str, text: str) -> None:
    """A newline (or any control character) in a name could end a line of a generated script and
    start a command of its own; such names are refused, whatever the sweep is asked to do."""
    bad = [c for c in text if ord(c) < 32 or ord(c) == 127]
    if bad:
        raise SweepError(f"{what} contains a control character ({bad[0]!r}): {text!r}")


def parse_seeds(text: str | None) -> list[int] | None:
    """``'1,2,3'`` -> [1, 2, 3] (``--seeds``); None without the option."""
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SweepError(f"--seeds expects comma-separated integers, e.g. 1,2,3; got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds expects distinct integers >= 0, e.g. 1,2,3; got {text!r}")
    return seeds


def seed_folder(out: Path, seed: int) -> Path:
    """Where ``--seeds`` puts one seed's runs: ``OUT/seed_<S>/<experiment>/`` (the run folders keep
    their names across seeds, so ``report`` matches a variant's runs by name and seed)."""
    return out / f"seed_{seed}"


def make_jobs(configs: list[str], out: Path, paired: bool = False, parts: int = 1,
              seeds: list[int] | None = None) -> list[Job]:
    """Jobs for the config files (one per config, or one paired job for all, or ``parts`` paired
    jobs, ``--pair-part 1/N .. N/N`` of the same pair), refusing missing files and two configs
    with the same stem. With ``seeds``: those jobs once per seed, in ``OUT/seed_<S>/``, seed by seed."""
    if seeds is not None:
        jobs = []
        for seed in seeds:
            for job in make_jobs(configs, seed_folder(out, seed), paired, parts):
                job.seed, job.name = seed, f"{job.name}_seed{seed}"
                job.log = out / "logs" / f"{job.name}.log"
                jobs.append(job)
        return jobs
    jobs, seen = [], {}
    for c in map(Path, configs):
        if not c.is_file():
            raise SweepError(f"config file not found: {c}")
        if c.stem in seen:
            raise SweepError(f"{seen[c.stem]} and {c} would share the run folder {out / c.stem}; "
                             "give configs distinct file names")
        seen[c.stem] = c
        jobs.append(Job(config=c, name=c.stem, run_dir=out / c.stem, log=out / "logs" / f"{c.stem}.log"))
    if paired and len(jobs) > 1:
        first, rest = jobs[0], jobs[1:]
        name = "paired_" + "_".join(j.name for j in jobs)
        names = paired_names(first, rest, out)
        parts = min(parts, len(names))
        if parts == 1:
            return [Job(config=first.config, name=name, run_dir=out / names[0], log=out / "logs" / f"{name}.log",
                        pair=[j.config for j in rest], pair_dirs=[out / n for n in names[1:]])]
        out_jobs = []
        for i in range(1, parts + 1):  # the trainer's --pair-part: variants i, i + N, ...
            mine, part_name = names[i - 1::parts], f"{name}_part{i}of{parts}"
            out_jobs.append(Job(config=first.config, name=part_name, run_dir=out / mine[0],
                                log=out / "logs" / f"{part_name}.log", pair=[j.config for j in rest],
                                pair_dirs=[out / n for n in mine[1:]], part=(i, parts)))
        return out_jobs
    return jobs


def paired_names(first: Job, rest: list[Job], out: Path) -> list[str]:
    """Run folder names the trainer will give a paired job's variants (config's
    logging.experiment, else the file's stem); the stems when the configs do not load yet."""
    job = Job(config=first.config, name=first.name, run_dir=out / first.name, log=out, pair=[j.config for j in rest])
    try:
        from fastvit_reduce.train import resolve_variants
        return [name for _, name in resolve_variants(train_args(job, out, []))]
    except ConfigError:
        return [first.name, *(j.name for j in rest)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvit-reduce sweep", description=__doc__.split("\n")[0],
                                epilog=__doc__.split("\n", 1)[1].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="trainer YAML files, one run each")
    p.add_argument("--paired", action="store_true",
                   help="train all configs in ONE process on the same batches (decoded and augmented "
                        "once; differences are the strategies', not data noise)")
    p.add_argument("--out", default="runs", help="sweep folder: runs, logs, summary (default: runs)")
    p.add_argument("--gpus", default=None,
                   help="GPU ids to use, e.g. 0,1,2,3 (default: none = CPU, one run at a time)")
    p.add_argument("--gpus-per-run", type=int, default=1, help="GPUs (= processes) per run (default 1)")
    p.add_argument("--cpu-slots", type=int, default=1,
                   help="CPU sweeps: run N jobs at once, each pinned to 1/N of this sweep's cores "
                        "(with --paired: the pair split over N processes, the same batches in each; "
                        "default 1 = one job at a time on every core)")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="run every job once per seed (training.seed), in OUT/seed_<S>/; report then gives "
                        "each variant's difference from the baseline with a 95 %% interval over seeds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="trainer override for every run, e.g. --set training.epochs=1 (repeatable)")
    p.add_argument("--slurm", action="store_true", help="write (and submit) one sbatch script per config")
    p.add_argument("--nodes", type=int, default=1, help="slurm: nodes per run")
    p.add_argument("--time", default="48:00:00", help="slurm: time limit per job (requeued when hit)")
    p.add_argument("--cpus-per-task", type=int, default=16, help="slurm: CPUs per node for loaders")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                   help="slurm: extra '#SBATCH ARG' line, e.g. --sbatch-arg=--partition=gpu (repeatable)")
    return p


def main(argv: list[str]) -> int:
    """Run (or, with --slurm, submit) the sweep; return 0 / 1 (a run failed) / 2 / 124 (interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    out = Path(args.out)
    try:
        gpus = parse_gpus(args.gpus)
        if args.gpus_per_run < 1 or (gpus and args.gpus_per_run > len(gpus)):
            raise SweepError(f"--gpus-per-run {args.gpus_per_run} does not fit "
                             f"--gpus {args.gpus or '(none)'}")
        for c in args.configs:
            refuse_control_chars("config path", c)
        refuse_control_chars("--out", args.out)
        if out.exists() and not out.is_dir():
            raise SweepError(f"--out {out} is a file, not a folder")
        refuse_control_chars("--time", args.time)
        for kv in args.set:
            refuse_control_chars("--set", kv)
        for e in args.sbatch_arg:
            refuse_control_chars("--sbatch-arg", e)
        for kv in args.set:
            if "=" not in kv or "." not in kv.split("=")[0] or kv.startswith("-"):
                raise SweepError(f"--set expects section.key=value, got {kv!r}")
            if kv.split("=")[0] in ("logging.folder", "logging.experiment"):
                raise SweepError(f"--set {kv.split('=')[0]} is chosen by the sweep (use --out / file names)")
        seeds = parse_seeds(args.seeds)
        if seeds is not None and any(kv.split("=")[0] == "training.seed" for kv in args.set):
            raise SweepError("--seeds sets training.seed for each job; drop --set training.seed")
        if args.slurm and args.cpu_slots > 1:
            raise SweepError("--cpu-slots runs jobs on this machine; it does not apply to --slurm")
        cpu_sets = split_cores(args.cpu_slots, bool(gpus))
        jobs = make_jobs(args.configs, out, paired=args.paired, parts=args.cpu_slots, seeds=seeds)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if gpus and len(gpus) % args.gpus_per_run:
        print(f"sweep: warning: {len(gpus) % args.gpus_per_run} GPU(s) left idle "
              f"({len(gpus)} GPUs, {args.gpus_per_run} per run)", file=sys.stderr)

    for job in jobs:
        if can_skip(job, out, args.set):
            job.status = "done"
            print(f"sweep: skip {job.name}: already complete ({job.run_dir / 'final.json'})")
        elif job_complete(job):
            print(f"sweep: {job.name} is complete but its config or --set changed: launching it, and the "
                  f"trainer refuses unless only harmless keys changed (delete {job.run_dir} to redo it)")
    todo = [j for j in jobs if j.status != "done"]
    if not args.slurm:
        try:
            size_decode_threads(todo, out, args.set, job_cores(cpu_sets) if not gpus else
                                len(os.sched_getaffinity(0)), args.cpu_slots)
        except SweepError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    if args.slurm:
        scripts = [write_sbatch(j.name, j.config, j.log, train_args(j, out, args.set), out,
                                nodes=args.nodes, gpus_per_node=args.gpus_per_run,
                                cpus_per_task=args.cpus_per_task, time_limit=args.time,
                                extra=args.sbatch_arg) for j in todo]
        rc = submit(scripts) if scripts else 0
        print(f"sweep: when the jobs are done: fastvit-reduce report {shlex.quote(str(out))}")
        return rc

    runner = Runner(jobs, out, args.set, gpus, args.gpus_per_run, cpu_sets)
    previous = {s: signal.signal(s, runner.stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        started = time.time()
        runner.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"\nsweep: {len(todo)} run(s) in {time.time() - started:.0f} s; summary in {out}/sweep_summary.*\n")
    print(report.write_summary(summary_rows(jobs, out), out), end="")
    if (out / "sweep_summary.png").is_file():
        print(f"\nplot: {out / 'sweep_summary.png'}")
    if runner.stopping:
        return 124
    return 0 if all(j.status == "done" for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
