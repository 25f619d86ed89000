"""Training speed of the face embedder on this CPU: samples/s per variant, side by side (issue 12).

    python -m bench.bench_embedder_training [--quick] [--rounds 3] [--steps 8] [--warmup 3]
        [--variants tf-fp32-112 tf-bf16-112 ...] [--images 384] [--out bench/results/x.json]

Every variant trains the student `facewatch train-embedder --teacher sface` builds (its own
`_build`: the small ConvNeXt, 128-d, ArcFace over the 4,608 training identities plus the two
distillation terms, AdamW) at batch 64, in its own subprocess: the Keras backend is chosen by
KERAS_BACKEND before keras is imported, and mixed precision is a global policy, so neither can
change inside one process. The baseline's worker stays up; every other variant's worker is
started in turn, warmed up, timed alternately with the baseline for --rounds rounds (which of
the two goes first alternates) and stopped, so the machine's noise hits both sides of each ratio
alike, with two workers alive at a time (each holds 1.3-1.8 GB).
A worker times `--steps` steps of `fit` (from the end of one step to the end of the last) and
its own CPU time (all threads), which gives CPU-ms per sample: the cost a loaded machine pays.

Variant names (any of these shapes can be passed to --variants):
- `<backend>-<precision>-<size>`: train steps on fixed synthetic batches (no input pipeline);
  backend `tf`, `tf-xla` (jit_compile), `torch` or `torch-passive` (OMP_WAIT_POLICY=PASSIVE:
  torch's OpenMP threads sleep instead of spinning while they wait); precision `fp32` or
  `bf16` (Keras `mixed_bfloat16`); size the input side. `tf-fp32-112` is the baseline, as
  trained today.
- `<backend>-<precision>-<size>-cache|decode`: the same train step fed by a real input
  pipeline on `--images` LFW files: `cache` is what training does now
  (`training.embedder_data.ShuffledBatches` over pre-cropped uint8 crops in memory, augmented
  per batch); `decode` reads each batch's JPEGs from disk with cv2 and aligns them with
  `stages.face_crop.crop_faces` (ArcFace five-point template, the box's average points: the
  same warp as a landmark-aligned crop) before the same augmentation.
- `pipeline-cache|decode-<size>`: the input pipeline alone, no train step (batches/s x 64).

`ratio_vs_baseline` is the median over rounds of (variant / the baseline's window beside it).
For a `pipeline-*` row it says how many times faster the pipeline alone is than the baseline's
train step consumes (>> 1: not a bottleneck). A variant that cannot run reports its error and
the tail of its log instead of numbers; the others go on. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:   # `python bench/x.py` as well as `python -m bench.x`
    sys.path.insert(0, str(REPO))

from bench.common import emit, environment, log, write_json_atomic  # noqa: E402

BASELINE = "tf-fp32-112"
DEFAULT_VARIANTS = (BASELINE, "tf-bf16-112", "torch-fp32-112", "torch-passive-fp32-112",
                    "tf-fp32-96", "tf-bf16-96", "tf-xla-fp32-112", "tf-fp32-112-cache",
                    "tf-fp32-112-decode", "pipeline-cache-112", "pipeline-decode-112")
QUICK_VARIANTS = (BASELINE, "tf-bf16-112", "torch-passive-fp32-112", "tf-fp32-96",
                  "pipeline-cache-112", "pipeline-decode-112")
# name -> (KERAS_BACKEND, jit_compile, extra environment of the worker)
BACKENDS = {"tf": ("tensorflow", False, ()), "tf-xla": ("tensorflow", True, ()),
            "torch": ("torch", False, ()),
            # torch's OpenMP threads spin while they wait for each other: on a machine busier
            # than its cores they burn the CPU the work needs (measured: 5-6x slower)
            "torch-passive": ("torch", False, (("OMP_WAIT_POLICY", "PASSIVE"),))}
# Identities of the full run's ArcFace head (training/splits/lfw_split.json: train_people).
TRAIN_PEOPLE = 4608
SETUP_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Variant:
    name: str
    backend: str          # KERAS_BACKEND
    precision: str        # fp32 | bf16
    input_size: int
    data: str             # synthetic | cache | decode
    train: bool           # False: the input pipeline alone
    jit: bool = False
    env: tuple = ()       # (name, value) pairs set in the worker's environment


def parse_variant(name: str) -> Variant:
    """`tf-fp32-112`, `tf-xla-bf16-96-cache`, `pipeline-decode-112`, ... (see the docstring)."""
    parts = name.split("-")
    try:
        if parts[0] == "pipeline":
            data, size = parts[1], int(parts[2])
            if len(parts) != 3 or data not in ("cache", "decode"):
                raise ValueError
            return Variant(name, "tensorflow", "fp32", size, data, train=False)
        backend = max((b for b in BACKENDS if name.startswith(b + "-")), key=len)
        rest = name[len(backend) + 1:].split("-")
        precision, size = rest[0], int(rest[1])
        data = rest[2] if len(rest) == 3 else "synthetic"
        if precision not in ("fp32", "bf16") or len(rest) > 3 \
                or data not in ("synthetic", "cache", "decode"):
            raise ValueError
    except (IndexError, ValueError):
        raise SystemExit(f"unknown variant {name!r}: <{'|'.join(BACKENDS)}>-<fp32|bf16>-<size>"
                         f"[-cache|-decode] or pipeline-<cache|decode>-<size>") from None
    if size < 32:
        raise SystemExit(f"variant {name!r}: input size must be >= 32")
    keras_backend, jit, env = BACKENDS[backend]
    return Variant(name, keras_backend, precision, size, data, train=True, jit=jit, env=env)


# ----------------------------------------------------------------------------- the worker
def _lfw_files(count: int):
    """`count` LFW training images spread over the alphabet (whole people, so labels repeat),
    with each person's label."""
    from facewatch.training.lfw import default_images_dir, image_path, list_people, load_split

    images = default_images_dir()
    people = list_people(images)
    val = set(load_split(images)["val_people"])
    names = [n for n in sorted(people) if n not in val and len(people[n]) >= 2]
    step = max(1, len(names) // max(1, count // 3))
    paths, labels = [], []
    for label, name in enumerate(names[::step]):
        for index in people[name]:
            paths.append(image_path(images, name, index))
            labels.append(label)
            if len(paths) == count:
                return paths, labels
    return paths, labels


def _datasets(variant: Variant, args, classes: int):
    """The variant's keras.utils.PyDataset (a length no timed window runs out of)."""
    import keras
    import numpy as np

    from facewatch.stages.face_crop import CropSpec, crop_faces
    from facewatch.training.embedder_data import ShuffledBatches, augment_batch, centre_box, read_image

    rng = np.random.default_rng(args.seed)
    size, batch = variant.input_size, args.batch

    def unit(n):
        v = rng.standard_normal((n, 128)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    long = 10 ** 6
    if variant.data == "synthetic":
        x = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
        y = (rng.integers(0, classes, batch).astype(np.int32), unit(batch))

        class Fixed(keras.utils.PyDataset):
            def __len__(self):
                return long

            def __getitem__(self, index):
                return x, y
        return Fixed(workers=1, use_multiprocessing=False)

    paths, labels = _lfw_files(args.images)
    labels = np.asarray(labels, np.int32)
    teacher = unit(len(paths))
    spec = CropSpec(size=size, alignment="arcface_five_point")
    if len(paths) < batch:
        raise RuntimeError(f"only {len(paths)} LFW images found, fewer than a batch of {batch}")

    def crop(path):
        frame = read_image(path)   # cv2.imread
        return crop_faces(frame, centre_box(frame.shape)[None], spec)[0][0]

    if variant.data == "cache":
        crops = np.stack([crop(p) for p in paths])   # once, as load_crop_cache does

        class Cached(ShuffledBatches):
            def __len__(self):
                return long

            def __getitem__(self, index):
                return super().__getitem__(index % (len(self.labelled) // self.batch_size))
        return Cached(crops, labels, batch, seed=args.seed, teacher=teacher, workers=1,
                      use_multiprocessing=False)

    class Decoded(keras.utils.PyDataset):
        """Per batch: cv2.imread of each file, the aligned crop, the same augmentation."""

        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.rng = np.random.default_rng(args.seed)
            self.order = self.rng.permutation(len(paths))
            self.per_epoch = len(paths) // batch

        def __len__(self):
            return long

        def __getitem__(self, index):
            index %= self.per_epoch
            rows = np.sort(self.order[index * batch:(index + 1) * batch])
            crops = np.stack([crop(paths[r]) for r in rows])
            aug = np.random.default_rng((int(self.rng.integers(1 << 31)), index))
            return augment_batch(crops, aug), (labels[rows], teacher[rows])

    return Decoded()


def _trainer(variant: Variant, args, classes: int):
    """The student of `train-embedder --teacher sface` (train_embedder._build), under the
    variant's precision and input size."""
    import keras

    from facewatch.training import train_embedder

    if variant.precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    parser = argparse.ArgumentParser()
    train_embedder.add_arguments(parser)
    targs = parser.parse_args(["--backbone", args.backbone, "--loss", "arcface", "--teacher",
                               "sface", "--embedding-size", "128", "--alignment",
                               "arcface_five_point", "--landmarks", "yunet", "--batch",
                               str(args.batch), "--seed", str(args.seed)])
    targs.input_size = variant.input_size   # (the parser only offers the sizes it trains at)
    trainer = train_embedder._build(targs, classes)
    if variant.jit:
        trainer.jit_compile = True
    return trainer


def _max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(spec: dict) -> None:
    """One variant, in this process: warm up, then time a window per request on stdin
    (`{"steps": N}` -> one JSON line on the protocol stream; `{"stop": true}` ends)."""
    variant = Variant(**spec["variant"])
    args = argparse.Namespace(**spec["args"])
    os.environ["KERAS_BACKEND"] = variant.backend   # before keras is imported
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                 # anything printed by a library goes to the log, not the protocol
    sys.stdout = sys.stderr

    def send(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    started = time.perf_counter()
    try:
        import keras

        dataset = _datasets(variant, args, args.classes)
        trainer = _trainer(variant, args, args.classes) if variant.train else None

        marks: list[tuple[float, float]] = []   # (wall, CPU) seconds at each step's end

        class StepTimes(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                marks.append((time.perf_counter(), _cpu_s()))

        def window(steps: int) -> dict:
            marks.clear()
            load = os.getloadavg()[0]
            if variant.train:
                # steps + 1: the window runs from the end of the first step to the end of the
                # last, leaving out fit()'s own start (iterator, first batches)
                fit = trainer.fit(dataset, epochs=1, steps_per_epoch=steps + 1, verbose=0,
                                  callbacks=[StepTimes()])
                loss = float(fit.history["loss"][-1])
                if len(marks) != steps + 1:
                    raise RuntimeError(f"fit ran {len(marks)} of {steps + 1} steps")
                seconds, done = marks[-1][0] - marks[0][0], steps
                cpu = marks[-1][1] - marks[0][1]
            else:
                loss = None
                t0, c0 = time.perf_counter(), _cpu_s()
                for i in range(steps):
                    dataset[i]
                seconds, done, cpu = time.perf_counter() - t0, steps, _cpu_s() - c0
            return {"samples_per_s": done * args.batch / seconds, "seconds": seconds,
                    "cpu_ms_per_sample": 1000 * cpu / (done * args.batch), "loss": loss,
                    "loadavg_1min": round(load, 2), "max_rss_mb": round(_max_rss_mb())}

        info = {"keras": keras.__version__, "backend": keras.backend.backend(),
                "policy": keras.mixed_precision.global_policy().name}
        if trainer is not None:
            info.update(parameters=int(trainer.embedder.count_params()),
                        compute_dtype=trainer.embedder.get_layer("stem_conv").compute_dtype
                        if args.backbone in ("small", "micro") else None,
                        jit_compile=bool(trainer.jit_compile))
        warm = window(args.warmup) if args.warmup > 0 else None
        info.update(setup_s=round(time.perf_counter() - started, 1),
                    warmup_samples_per_s=None if warm is None else round(warm["samples_per_s"], 2))
        send({"ready": True, **info})
    except Exception as exc:   # reported, not raised: the other variants go on
        send({"error": f"{type(exc).__name__}: {exc}"})
        return
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("stop"):
            break
        try:
            send(window(int(request["steps"])))
        except Exception as exc:
            send({"error": f"{type(exc).__name__}: {exc}"})
            return


# ----------------------------------------------------------------------------- the parent
class Worker:
    def __init__(self, variant: Variant, args, logdir: Path):
        self.variant = variant
        self.log_path = logdir / f"{variant.name}.log"
        self._log = open(self.log_path, "wb")
        spec = {"variant": asdict(variant),
                "args": {k: getattr(args, k) for k in ("batch", "images", "seed", "backbone",
                                                       "warmup", "classes")}}
        env = {**os.environ, "KERAS_BACKEND": variant.backend, "PYTHONUNBUFFERED": "1",
               **dict(variant.env)}
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.bench_embedder_training",
                                      "--worker", json.dumps(spec)], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log)
        self.error: str | None = None
        self.info: dict = {}
        self.stopped = False

    def log_tail(self, chars: int = 1500) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        lines = [ln for ln in text.splitlines() if not ln.startswith(("WARNING: All log", "I0000"))]
        return "\n".join(lines)[-chars:]

    def reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return {"error": f"no answer within {timeout:.0f} s"}
        line = self.proc.stdout.readline()
        if not line:
            return {"error": f"the worker exited with {self.proc.wait()}"}
        return json.loads(line)

    def request(self, obj: dict, timeout: float) -> dict:
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"error": f"the worker exited with {self.proc.wait()}"}
        return self.reply(timeout)

    def fail(self, error: str) -> None:
        self.error = error
        log(f"{self.variant.name}: {error}")
        self.stop()

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"stop": true}\n')
                self.proc.stdin.flush()
                self.proc.wait(20)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def _start(variant: Variant, args, logdir: Path) -> Worker:
    log(f"{variant.name}: starting (backend {variant.backend}, {variant.precision}, "
        f"{variant.input_size} px, {variant.data}{'' if variant.train else ', no train step'})")
    w = Worker(variant, args, logdir)
    answer = w.reply(SETUP_TIMEOUT_S)
    if "error" in answer:
        w.fail(answer["error"])
    else:
        w.info = {k: val for k, val in answer.items() if k != "ready"}
        log(f"{variant.name}: ready in {w.info['setup_s']} s")
    return w


def _window(w: Worker, args, r: int, samples: list[dict]) -> bool:
    answer = w.request({"steps": args.steps if w.variant.train else args.pipeline_batches},
                       SETUP_TIMEOUT_S)
    if "error" in answer:
        w.fail(answer["error"])
        return False
    answer["round"] = r
    samples.append(answer)
    log(f"  {w.variant.name}: {answer['samples_per_s']:.1f} samples/s, "
        f"{answer['cpu_ms_per_sample']:.1f} CPU-ms/sample, load {answer['loadavg_1min']}")
    return True


def run(args) -> dict:
    """The baseline's worker stays up; every other variant in turn is started, alternated with
    it for --rounds rounds (which of the two goes first alternates too), and stopped: two
    workers at a time (each holds 1.3-1.8 GB), every ratio side by side."""
    variants = [parse_variant(n) for n in args.variants]
    if BASELINE not in args.variants:
        variants.insert(0, parse_variant(BASELINE))
    env = environment()
    logdir = Path(tempfile.mkdtemp(prefix="fwbench-train-"))
    samples: dict[str, list[dict]] = {v.name: [] for v in variants}
    base_of: dict[str, list[dict]] = {v.name: [] for v in variants}   # the baseline beside it
    workers: dict[str, Worker] = {}
    base = _start(variants[0], args, logdir)
    workers[BASELINE] = base
    try:
        for v in variants[1:]:
            if base.error is not None:
                break
            w = workers[v.name] = _start(v, args, logdir)
            try:
                for r in range(1, args.rounds + 1):
                    if w.error is not None:
                        break
                    pair = (base, w) if r % 2 else (w, base)
                    ok = [_window(x, args, r, samples[v.name] if x is w else base_of[v.name])
                          for x in pair]
                    if not all(ok):
                        break
            finally:
                w.stop()
    finally:
        base.stop()
    table = {}
    every_base = [s for rows in base_of.values() for s in rows]
    for v in variants:
        w = workers.get(v.name)
        rows = every_base if v.name == BASELINE else samples[v.name]
        entry = {"backend": v.backend, "precision": v.precision, "input_size": v.input_size,
                 "data": v.data, "train_step": v.train, "jit_compile": v.jit,
                 "worker_env": dict(v.env)}
        if rows:
            beside = {s["round"]: s["samples_per_s"] for s in base_of.get(v.name, [])}
            ratios = ([1.0] * len(rows) if v.name == BASELINE else
                      [s["samples_per_s"] / beside[s["round"]] for s in rows
                       if s["round"] in beside])
            entry.update({
                "samples_per_s": round(statistics.median(s["samples_per_s"] for s in rows), 2),
                "ratio_vs_baseline": round(statistics.median(ratios), 3) if ratios else None,
                "cpu_ms_per_sample": round(statistics.median(s["cpu_ms_per_sample"]
                                                             for s in rows), 2),
                "samples_per_s_by_round": [round(s["samples_per_s"], 2) for s in rows],
                "baseline_samples_per_s_by_round": [round(beside[s["round"]], 2) for s in rows
                                                    if s["round"] in beside]
                if v.name != BASELINE else None,
                "ratio_by_round": [round(x, 3) for x in ratios],
                "loadavg_1min_by_round": [s["loadavg_1min"] for s in rows],
                "max_rss_mb": max(s["max_rss_mb"] for s in rows),
                "last_loss": rows[-1]["loss"],
            })
            if not v.train:
                entry["batches_per_s"] = round(entry["samples_per_s"] / args.batch, 2)
        entry.update(w.info if w else {})
        if w is None:
            entry["error"] = "not run: the baseline failed"
        elif w.error is not None:
            entry["error"] = w.error
            entry["log_tail"] = w.log_tail()
        table[v.name] = entry
    loads = [s["loadavg_1min"] for rows in (*samples.values(), every_base) for s in rows]
    return {"benchmark": "embedder_training", "baseline": BASELINE,
            "command": " ".join(["python -m bench.bench_embedder_training", *sys.argv[1:]]),
            "batch": args.batch, "steps": args.steps, "pipeline_batches": args.pipeline_batches,
            "warmup_steps": args.warmup, "rounds": args.rounds, "backbone": args.backbone,
            "arcface_classes": args.classes, "lfw_images": args.images,
            "student": "train_embedder._build as for --teacher sface: ArcFace (s 32, m 0.4) "
                       "+ 10 x (1 - cos) + 10 x relation MSE to 128-d teacher vectors, AdamW",
            "variants": table,
            "loadavg_1min_during": {"min": min(loads), "median": round(statistics.median(loads), 2),
                                    "max": max(loads)} if loads else None,
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()], "environment": env}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"variant names (default: {' '.join(DEFAULT_VARIANTS)}; the baseline "
                        f"{BASELINE} is always added)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    p.add_argument("--steps", type=int, default=8, help="timed train steps per variant per round")
    p.add_argument("--pipeline-batches", type=int, default=None,
                   help="timed batches of a pipeline-* variant (default: 2 x --steps)")
    p.add_argument("--warmup", type=int, default=3, help="untimed train steps after start-up")
    p.add_argument("--batch", type=int, default=64, help="faces per training batch")
    p.add_argument("--images", type=int, default=384, help="real LFW files of the pipelines")
    p.add_argument("--classes", type=int, default=TRAIN_PEOPLE,
                   help="identities of the ArcFace head (the full run's)")
    p.add_argument("--backbone", default="small", help="small (trained), micro (tests only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.add_argument("--quick", action="store_true",
                   help=f"{' '.join(QUICK_VARIANTS)}; 1 round of 3 steps after 2 warm-up steps")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, min(args.steps, 3), min(args.warmup, 2)
        args.variants = args.variants or list(QUICK_VARIANTS)
    args.variants = args.variants or list(DEFAULT_VARIANTS)
    args.pipeline_batches = args.pipeline_batches or 2 * args.steps
    result = run(args)
    if args.out:
        write_json_atomic(args.out, result)
    emit(result)


if __name__ == "__main__":
    main()
