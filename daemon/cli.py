"""`facewatch` command line: one table of subcommands, each implemented in its own module.

Modules are imported only when their command runs, so `facewatch events` does not pay for
TensorFlow and `facewatch run` does not import training code. `--help` of a training command
imports its module with TensorFlow, Keras, torch and friends replaced by inert stand-ins
(`_help_stubs`), so every help is quick and prints nothing but the help.

Exit statuses are one table (stages.errors, README "Exit statuses").
"""
from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import types

from facewatch.stages.errors import EXIT_PIPE, EXIT_SETUP, EXIT_USAGE, SetupError

DESCRIPTION = """\
facewatch recognises enrolled people on RTSP cameras, video devices and video files, and
publishes one JSON event per decision (ZeroMQ, JSONL log) with Prometheus metrics.

Operator's path: put the cameras in config.yaml, `facewatch validate-config config.yaml`,
`facewatch enroll --config config.yaml --name NAME photo.jpg ...`, then
`facewatch run --config config.yaml` (or the systemd unit) and `facewatch events`.
The models ship with the package; `facewatch COMMAND --help` describes each command."""

EPILOG = """\
exit statuses: 0 done (every stream ended, or stopped by SIGTERM/SIGINT); 1 unexpected error;
2 bad command line or a refused request (photo, gallery); 69 every camera ended with an error;
78 unusable configuration or model file (systemd does not restart); 141 output pipe closed."""

# name -> (module, help). The module provides add_arguments(parser) and run(args) -> int | None.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("facewatch.daemon.run_command", "run the daemon (supervisor and every stage)"),
    "demo": ("facewatch.daemon.demo", "build the demo input, enroll, run the daemon and print events"),
    "enroll": ("facewatch.daemon.gallery_commands", "enroll a person from one or more photos"),
    "gallery": ("facewatch.daemon.gallery_commands", "list, remove or export gallery entries"),
    "events": ("facewatch.daemon.events_command", "subscribe to recognition events and print JSON lines"),
    "validate-config": ("facewatch.daemon.config", "check a config file and the models it names: "
                        "whatever `run` would refuse, with its exit status"),
    "keys": ("facewatch.daemon.keys_command", "make CURVE keys for the encrypted event socket"),
    "train-detector": ("facewatch.training.train_detector", "train the YOLOv8 face detector"),
    "label-faces": ("facewatch.training.pseudo_labels", "label detector training images with the CenterFace teacher"),
    "pack-detector-data": ("facewatch.training.pack_detector_data", "the detector's training set, resized, as one folder for a GPU host"),
    "quantize-model": ("facewatch.export.quantize_onnx", "int8 copy of a model for CPU inference, calibrated on training images"),
    "export-detector": ("facewatch.export.detector_onnx", "export a detector checkpoint to ONNX"),
    "evaluate-detector": ("facewatch.training.evaluate_detector", "AP of a detector on WIDER FACE format"),
    "train-embedder": ("facewatch.training.train_embedder", "train the ConvNeXt-Siamese embedder"),
    "export-embedder": ("facewatch.export.embedder_onnx", "export an embedder checkpoint to ONNX"),
    "evaluate-embedder": ("facewatch.training.evaluate_embedder", "verification metrics on LFW-format pairs"),
    "evaluate-oneshot": ("facewatch.training.oneshot_scenario", "score one-shot recognition on a generated video"),
    "teacher-cache": ("facewatch.training.teacher_cache", "dlib landmarks and teacher embeddings (LFW; --unlabelled: WIDER and clip faces)"),
    "train-landmarks": ("facewatch.training.train_landmarks", "train the five-point landmark model"),
    "export-landmarks": ("facewatch.export.landmarks_onnx", "export a landmark checkpoint to ONNX"),
}


# Imported by training and export code at module level; never needed to print a help.
HEAVY_MODULES = ("tensorflow", "keras", "tf_keras", "tf2onnx", "torch", "torchvision",
                 "ultralytics", "dlib", "face_recognition_models", "onnxslim")


class _Inert:
    """Stands for anything reached through a stubbed module while a help is built: attributes
    are more stand-ins, calling one returns a stand-in (or, used as a decorator, the decorated
    thing), subclassing one subclasses object."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert(f"{self._name}.{name}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]
        return _Inert(f"{self._name}()")

    def __mro_entries__(self, bases):
        return (object,)

    def __iter__(self):
        return iter(())


class _StubModule(types.ModuleType):
    __path__: list = []

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert(f"{self.__name__}.{name}")


class _HelpStubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in HEAVY_MODULES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        pass


def _add_command_arguments(parser: argparse.ArgumentParser, name: str, stubbed: bool) -> None:
    stubs = _HelpStubs() if stubbed else None
    before = set(sys.modules)
    if stubs is not None:
        sys.meta_path.insert(0, stubs)
    try:
        mod = importlib.import_module(COMMANDS[name][0])
        add = getattr(mod, f"add_{name.replace('-', '_')}_arguments", None) or mod.add_arguments
        add(parser)
    finally:
        if stubs is not None:
            sys.meta_path.remove(stubs)
            # the stand-ins, and our modules imported against them, must not be found by a later
            # real import (a help normally ends the process; tests build several in one)
            for key in set(sys.modules) - before:
                if isinstance(sys.modules[key], _StubModule) or \
                        key.startswith("facewatch."):
                    del sys.modules[key]


def build_parser(command: str | None = None, for_help: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facewatch", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the chosen command's module is imported
            if for_help:
                try:
                    _add_command_arguments(p, name, stubbed=True)
                except Exception:  # noqa: BLE001  module-level code the stand-ins cannot satisfy:
                    # build this help the slow way (a fresh parser: the failed one may be half
                    # filled); what was imported against the stand-ins is gone already
                    return build_parser(command, for_help=False)
            else:
                _add_command_arguments(p, name, stubbed=False)
    return parser


def _closed_pipe() -> int:
    """stdout's reader went away (`facewatch gallery export | head`): no traceback, and no second
    error when Python flushes stdout at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_PIPE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    for_help = command is not None and any(a in ("-h", "--help") for a in argv)
    if for_help:   # should the real modules load after all: no TensorFlow banner in a help
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        args = build_parser(command, for_help).parse_args(argv)
    except BrokenPipeError:
        return _closed_pipe()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    mod = importlib.import_module(COMMANDS[args.command][0])
    run = getattr(mod, f"run_{args.command.replace('-', '_')}", None) or mod.run
    log = logging.getLogger("facewatch")
    try:
        code = int(run(args) or 0)
        sys.stdout.flush()   # a closed pipe shows here, inside the handler
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except SetupError as exc:   # a model or key file that cannot be used: restarting won't help
        log.error("%s", exc)
        return EXIT_SETUP
    except ValueError as exc:
        from facewatch.daemon.config import ConfigError

        log.error("%s", exc)
        # a configuration that cannot be used: 78 (EX_CONFIG), which systemd does not restart
        return EXIT_SETUP if isinstance(exc, ConfigError) else EXIT_USAGE
    except FileNotFoundError as exc:  # user-facing errors: one clear line
        log.error("%s", exc)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
