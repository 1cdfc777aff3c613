"""
sample.py: generate text from a patchgpt checkpoint. After stage 2 the model is an ordinary GPT, so
sampling is plain token-level sampling, one token at a time.

  python sample.py --out_dir out/k4_lam0.67 --prompt "ROMEO:" --num_samples 2 --max_new_tokens 100
"""

import os

import torch
import torch.nn.functional as F

import guards
import patchgpt as P


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, n_ids=guards.GPT2_VOCAB):
    """idx: (B, T) token ids; appends max_new_tokens sampled ids below n_ids to each row."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size :])  # (B, T, vocab)
        # only the data's ids: GPT-2's padding rows of the embedding table have no text to decode to
        logits = logits[:, -1, :n_ids] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("inf")
        idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)), dim=1)
    return idx


def sample(
    out_dir,
    prompt="",
    num_samples=3,
    max_new_tokens=200,
    temperature=0.8,
    top_k=200,
    device="auto",
    seed=1337,
    log=print,
):
    from prepare_data import PrepareError, char_ids, get_encoding

    path = os.path.join(out_dir, "ckpt.pt")
    train_first = f"to sample from; train one first (python patchgpt.py --out_dir {out_dir})"
    ckpt = guards.load_checkpoint(path, missing=train_first)
    try:  # the model as the run made it; a checkpoint of another version of it is one line
        tc = P.TrainConfig(**ckpt["train_config"])
        model = P.make_model(P.GPTConfig(**ckpt["model_config"]), tc)
        model.load_state_dict(ckpt["model"])
    except (TypeError, RuntimeError) as e:
        raise guards.UserError(f"{path} does not fit this model: {' '.join(str(e).split())}") from None
    device = guards.pick_device(device)
    model.to(device).eval()
    stages = P.plan_stages(tc, model.config.block_size)
    i = ckpt["stage_idx"]  # the stage it would train next: a patch stage, or a token stage not begun
    if i < len(stages) and (stages[i].K > 1 or (i > 0 and ckpt["step"] == 0)):
        log("note: this checkpoint has had no token-level training yet; expect poor samples")
    # the vocabulary the run trained in; a checkpoint from before character data was GPT-2's
    vocab = ckpt.get("vocab", {"tokenizer": "gpt2", "vocab_size": guards.GPT2_VOCAB, "chars": None})
    try:
        if vocab["chars"]:  # no prompt: the vocabulary's first character, a newline in most texts
            ids, lost = char_ids(vocab["chars"], prompt or vocab["chars"][0])
            if lost:
                unknown = "".join(sorted(set(lost)))
                raise guards.UserError(f"--prompt: characters that are not in the vocabulary: {unknown!r}")
            ids = ids.tolist()
        else:
            enc = get_encoding()
            ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) if prompt else [enc.eot_token]
    except PrepareError as e:  # no GPT-2 tokenizer here
        raise guards.UserError(str(e)) from None
    torch.manual_seed(seed)
    x = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    rows = generate(model, x, max_new_tokens, temperature, top_k, vocab["vocab_size"])
    if vocab["chars"]:
        texts = ["".join(vocab["chars"][i] for i in row.tolist()) for row in rows]
    else:
        texts = [enc.decode(row.tolist()) for row in rows]
    for text in texts:
        log(text + "\n" + "-" * 40)
    return texts


def build_parser():
    p = guards.Parser(description="Generate text from a patchgpt checkpoint.")  # one-line errors, exit code 2
    d = " (default: %(default)s)"
    p.add_argument("--out_dir", default="out/k4_lam0.67", help="the run's folder, with its ckpt.pt" + d)
    p.add_argument("--prompt", default="", help="text to continue (default: none, start from <|endoftext|>)")
    p.add_argument("--num_samples", type=int, default=3, help="how many samples" + d)
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to add to each sample" + d)
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature, > 0" + d)
    p.add_argument("--top_k", type=int, default=200, help="sample among the top_k likeliest tokens" + d)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps" + d)
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampling" + d)
    return p


def run(args):
    if not (
        args.temperature > 0
        and args.top_k >= 1
        and args.num_samples >= 1
        and args.max_new_tokens >= 0
        and args.seed >= 0
    ):
        raise guards.UserError(
            "needs --temperature > 0, --top_k >= 1, --num_samples >= 1, --max_new_tokens >= 0, --seed >= 0"
        )
    sample(
        args.out_dir,
        args.prompt,
        args.num_samples,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.device,
        args.seed,
    )


if __name__ == "__main__":
    P.main(parser=build_parser(), action=run)
