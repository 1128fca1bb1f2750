"""`run.py` with an audit hook, for torchrun tests: each process lists every file it opens for writing or renames
into, one path a line, in AUDIT_DIR/written-rank<RANK>.txt, so a test can check which rank wrote what."""
import os
import sys

import run

WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def main() -> int:
    log = open(os.path.join(os.environ["AUDIT_DIR"], f"written-rank{os.environ.get('RANK', '0')}.txt"), "w",
               buffering=1)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, os.PathLike)):
            mode, flags = args[1], args[2]
            if (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & WRITES):
                log.write(f"{os.path.abspath(args[0])}\n")
        elif event == "os.rename":
            log.write(f"{os.path.abspath(args[1])}\n")

    sys.addaudithook(hook)
    return run.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
