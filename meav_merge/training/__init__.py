"""Training alignment vectors: ``MeavTrainConfig`` beside the DPO runner (trl, IPO loss), and the frozen-trunk trainer."""
