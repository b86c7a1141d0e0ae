"""Does zero padding change the Higgs audio tokenizer's codes of the unpadded part? (Why tokenized_audio batches only
clips of one exact length.) Encodes random waves alone and with N samples of silence appended, and counts the frames
of the original length whose codes differ.

    .venv/bin/python benchmarks/bench_codec_padding.py [--tokenizer demo]
"""

from __future__ import annotations

import argparse

import torch

from higgs_pipeline.models.loading import load_audio_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="demo")
    args = parser.parse_args()
    tokenizer = load_audio_tokenizer(args.tokenizer)
    rate = tokenizer.sampling_rate
    generator = torch.Generator().manual_seed(0)
    print("| samples | padding (samples) | frames | frames whose codes differ |")
    print("| --- | --- | --- | --- |")
    for length in (rate * 2, rate * 2 + 123, rate * 3 + 7):
        wave = torch.randn(length, generator=generator) * 0.1
        alone = tokenizer.encode(wave.numpy(), sr=rate)
        for padding in (1, 320, 960, rate):
            padded = tokenizer.encode(torch.cat([wave, torch.zeros(padding)]).numpy(), sr=rate)
            frames = alone.shape[-1]
            differ = int((alone != padded[:, :frames]).any(0).sum())
            print(f"| {length} | {padding} | {frames} | {differ} |")


if __name__ == "__main__":
    main()
