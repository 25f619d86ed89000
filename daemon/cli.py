"""`facewatch` command line: one table of subcommands, each implemented in its own module.

Modules are imported only when their command runs, so `facewatch events` does not pay for
TensorFlow and `facewatch run` does not import training code.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, help). The module provides add_arguments(parser) and run(args) -> int | None.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("daemon.run_command", "run the daemon (supervisor and every stage)"),
    "demo": ("daemon.demo", "build the demo input, enroll, run the daemon and print events"),
    "enroll": ("daemon.gallery_commands", "enroll a person from one or more photos"),
    "gallery": ("daemon.gallery_commands", "list, remove or export gallery entries"),
    "events": ("daemon.events_command", "subscribe to recognition events and print JSON lines"),
    "validate-config": ("daemon.config", "check a config file; name the bad key and value"),
    "keys": ("daemon.keys_command", "make CURVE keys for the encrypted event socket"),
    "train-detector": ("training.train_detector", "train the YOLOv8 face detector"),
    "export-detector": ("export.detector_onnx", "export a detector checkpoint to ONNX"),
    "evaluate-detector": ("training.evaluate_detector", "AP of a detector on WIDER FACE format"),
    "train-embedder": ("training.train_embedder", "train the ConvNeXt-Siamese embedder"),
    "export-embedder": ("export.embedder_onnx", "export an embedder checkpoint to ONNX"),
    "evaluate-embedder": ("training.evaluate_embedder", "verification metrics on LFW-format pairs"),
    "evaluate-oneshot": ("training.oneshot_scenario", "score one-shot recognition on a generated video"),
    "teacher-cache": ("training.teacher_cache", "dlib landmarks and teacher embeddings (LFW; --unlabelled: WIDER and clip faces)"),
    "train-landmarks": ("training.train_landmarks", "train the five-point landmark model"),
    "export-landmarks": ("export.landmarks_onnx", "export a landmark checkpoint to ONNX"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facewatch", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # only the chosen command's module is imported
            mod = importlib.import_module(module)
            add = getattr(mod, f"add_{name.replace('-', '_')}_arguments", None) or mod.add_arguments
            add(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(command).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    mod = importlib.import_module(COMMANDS[args.command][0])
    run = getattr(mod, f"run_{args.command.replace('-', '_')}", None) or mod.run
    try:
        return int(run(args) or 0)
    except (FileNotFoundError, ValueError) as exc:  # user-facing errors: one clear line, exit 2
        logging.getLogger("facewatch").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
