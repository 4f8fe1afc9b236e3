"""`rrtf convert` holds the output plus about one tensor, never two copies of the model."""

import tracemalloc

from conftest import make_hf_model, save_hf
from model.convert import convert_hf, hf_param_bytes, read_hf_config


def test_peak_host_memory_is_output_plus_one_tensor(tmp_path):
  # 8 layers, D 256, V 8192: 30 MB of fp32 output; the largest tensor (wte) is 8.4 MB.
  hf_dir = save_hf(
    make_hf_model(True, seed=4, n_layer=8, n_embd=256, n_head=8, vocab_size=8192, n_positions=256),
    tmp_path / "hf",
  )
  cfg, _ = read_hf_config(hf_dir)
  out_bytes = hf_param_bytes(cfg, "float32")
  largest = cfg.vocab_size * cfg.embed_dim * 4
  # numpy reports its buffers to tracemalloc, so this sees every array the conversion makes.
  tracemalloc.start()
  tracemalloc.reset_peak()
  convert_hf(hf_dir, str(tmp_path / "out"), progress=False)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  print(
    f"output {out_bytes / 1e6:.1f} MB, largest tensor {largest / 1e6:.1f} MB, "
    f"peak {peak / 1e6:.1f} MB"
  )
  assert peak < out_bytes + largest + (2 << 20), (peak, out_bytes, largest)
  assert peak < 2 * out_bytes  # a naive load-everything-then-convert would need at least this
