from cases import AdapterCase

# Bone's D is shared by every block of a line and added to each, so one Adam step moves the update
# about in/r times as far as a LoRA factor's step: the suite trains it at 1e-3 (LoRA rows: 1e-2).
CASES = [
    # Bone (arXiv 2409.15371): one r x r block per output block ("col") or per input block ("row")
    AdapterCase("bone", "bone", {}, False, True, lambda n_in, n_out, r: n_out * r, lr=1e-3),
    AdapterCase("bone-row", "bone", {"structure": "row"}, False, True, lambda n_in, n_out, r: n_in * r, lr=1e-3),
]

CASES += [
    # MiSS (PEFT's successor of Bone): D r x out on the summed input chunks; r x mini_r tiled; Bone-col ("bat")
    AdapterCase("miss", "miss", {}, False, True, lambda n_in, n_out, r: r * n_out, lr=1e-3),
    AdapterCase("miss-mini", "miss", {"variant": "mini", "mini_r": 8}, False, True, lambda n_in, n_out, r: r * 8,
                lr=1e-3),
    AdapterCase("miss-bat", "miss", {"variant": "bat"}, False, True, lambda n_in, n_out, r: n_out * r, lr=1e-3),
]
