"""How much the training precision changes what teachers and tokenizers produce, on fixed inputs.

    python benchmarks/teacher_precision.py

For ViT-B-sized models at random initialisation (4 random 224 px images), each compared with the same weights
in fp32: data2vec's regression targets (relative and largest absolute error), iBOT's sharpened teacher
distributions (KL in nats at temperature 0.04) and BEiT's tokenizer ids (fraction flipped, a random
DALL-E-sized dVAE). The official code computes data2vec's targets in fp32 (outside autocast) and runs iBOT's
teacher and BEiT's tokenizer under fp16 autocast; mimscale's defaults follow that (``teacher_precision``).
A trained network's numbers differ from random initialisation's: rerun this on your checkpoints.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from mimscale import create_method
from mimscale.methods.data2vec import data2vec_targets
from mimscale.models.tokenizer import random_tokenizer, to_unit_range


def bf16(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).to(torch.bfloat16)


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224)

    d2v = create_method("data2vec").eval()
    t32 = d2v.targets(x)
    _, layers = bf16(d2v.teacher)(x.to(torch.bfloat16), collect=d2v.target_layers)
    t16 = data2vec_targets([y[:, 1:] for y in layers], d2v.target_norm)
    print(f"data2vec targets: relative error {float((t16 - t32).norm() / t32.norm()):.2e}, "
          f"largest {float((t16 - t32).abs().max()):.3f} (targets have unit variance)")

    ibot = create_method("ibot", num_local_crops=0).eval()
    o32 = ibot.teacher.head(ibot.teacher.encoder(x)[0])
    teacher16 = bf16(ibot.teacher)
    o16 = teacher16.head(teacher16.encoder(x.to(torch.bfloat16))[0]).float()
    for name, a, b in (("CLS", o32[:, 0], o16[:, 0]), ("patch", o32[:, 1:], o16[:, 1:])):
        p, log_q = F.softmax(a / 0.04, -1), F.log_softmax(b / 0.04, -1)
        kl = (p * (torch.log(p.clamp_min(1e-30)) - log_q)).sum(-1).mean()
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()
        print(f"iBOT teacher {name}: KL(fp32 || bf16) {float(kl):.2e} nats (entropy {float(entropy):.2f})")

    tok = random_tokenizer((14, 14), stride=8, vocab_size=8192, n_hid=256).eval()
    x01 = to_unit_range(x)
    ids32, ids16 = tok(x01, (14, 14)), bf16(tok)(x01.to(torch.bfloat16), (14, 14))
    print(f"BEiT tokenizer: {float((ids32 != ids16).float().mean()):.2%} of ids flipped by bf16")


if __name__ == "__main__":
    main()
