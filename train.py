"""Train the tumour classifier or segmenter: `python train.py --help`."""

from flaxtumor.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
