"""--task generate: unified text + image generation (BAGEL / Transfusion style, scaled down).

One Hugging Face causal LM runs over interleaved text tokens and image patch tokens:
  text token   -> the LM's own embedding table; next-token cross-entropy on assistant text
  image block  -> [start] patch_1 ... patch_N [end]; each patch token is
                  Linear(patch -> d)(x_t) + timestep embedding(t) + 2D sin-cos position,
                  and a zero-initialised Linear(d -> patch) head predicts the flow-matching
                  velocity v = eps - x0 of x_t = (1 - t) x0 + t eps, t = sigmoid(N(0, 1)).
Attention (an explicit mask): causal over text; bidirectional inside an image block; a noised
image block that carries loss is invisible to every later token (a clean copy follows it when
later turns must see the image); samples packed into one row never see each other; with
text-condition dropout a noised block does not see the text before it (classifier-free guidance).
Every block shares one RoPE position; text positions run on after it.
Latent space (a VAE, tasks/latent.py): the same, with patches cut from the frozen VAE's scaled
latents (encoded on the device per batch, each distinct image once) and samples decoded through
it. Loss falls on assistant turns only.

The parts, data first:
  records.py    the data files: JSON / JSONL records in three formats -> conversations
  patches.py    images as tokens: ImageSpec, patches of pixels or latents, the timestep draw
  sequences.py  a conversation as one sequence: its parts, token arrays, attention mask
  batches.py    the dataset, collation into padded or packed rows, the loader
  model.py      UnifiedModel, its losses, the language model, the checkpoint files
  sampling.py   text -> image (Euler steps, guidance), image -> text (greedy), with a KV cache
  task.py       the task train.py and eval.py run (tasks/base.py)
"""
