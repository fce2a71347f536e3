"""Small Hugging Face model directories as users have them: configs with random weights saved
with ``save_pretrained`` next to a small tokenizer of the matching kind (GPT-2's byte-level BPE
with one ``<|endoftext|>``, a LLaMA-style BPE with distinct ``<s>`` / ``</s>``, a BERT WordPiece
with ``[CLS]`` / ``[SEP]`` / ``[MASK]`` and no EOS)."""

from __future__ import annotations

from pathlib import Path

import torch

#: English text the tokenizers are trained on and the tests fine-tune on (a few paragraphs)
TEXT = (
    "The interpreter reads a program and executes it statement by statement. A statement may define a "
    "function, assign a value to a name, or call another function with arguments.\n\n"
    "Functions are objects: they can be passed as arguments, returned from other functions and stored in "
    "data structures. A function that takes or returns functions is called higher order.\n\n"
    "Names are bound in scopes. The local scope of a function holds its parameters and the names it "
    "assigns; the global scope holds the names a module defines; the builtins come last.\n\n"
    "An exception interrupts the normal flow of a program. It propagates up the call stack until a handler "
    "that matches its type catches it, or the program stops with a traceback.\n\n"
)


def byte_level_tokenizer(special: list[str], **roles):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=512, **roles)


def wordpiece_tokenizer(directory: Path):
    """A BERT-style WordPiece tokenizer (lower-casing, [CLS] / [SEP] / [MASK], no EOS) whose
    vocabulary holds the specials, the words of TEXT and single letters."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w.strip(".,:;()").lower() for w in TEXT.split()} - {""})
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = list(dict.fromkeys([*specials, *".,:;()", *letters, *(f"##{c}" for c in letters), *words]))
    wordpiece = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    directory.mkdir(parents=True, exist_ok=True)
    return PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]", model_max_length=512)


def gpt2_dir(directory: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = byte_level_tokenizer(["<|endoftext|>"], bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)  # no pad token, as GPT-2's own
    return directory


def llama_dir(directory: Path, seed: int = 0, *, head: bool = True) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    tokenizer = byte_level_tokenizer(["<s>", "</s>"], bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    (LlamaForCausalLM if head else LlamaModel)(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def bert_dir(directory: Path, seed: int = 0, *, mlm_head: bool = True) -> Path:
    from transformers import BertConfig, BertForMaskedLM, BertModel

    tokenizer = wordpiece_tokenizer(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    (BertForMaskedLM if mlm_head else BertModel)(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def text_file(directory: Path, paragraphs: int = 24) -> Path:
    """One .txt file of ``paragraphs`` paragraphs (TEXT's four, repeated with a counter)."""
    blocks = [block for block in TEXT.split("\n\n") if block]
    body = "\n\n".join(f"{blocks[i % len(blocks)]} ({i})" for i in range(paragraphs))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "notes.txt"
    path.write_text(body + "\n")
    return path
