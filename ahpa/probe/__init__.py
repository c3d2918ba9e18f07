"""Per-sample gradients and the G-SNR of the alignment gradient: the maths that training (``train.gsnr_every``)
and ``ahpa diagnose gsnr`` share (paper Sec. 3; docs/design.md section 6)."""
