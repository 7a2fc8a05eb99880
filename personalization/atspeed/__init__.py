"""AtSpeed-style generative recommendation: catalogue-constrained beam search (`beams`,
`catalogue`), token-tree attention with KV rollback (`tree`), the draft model and its
distillation (`draft`, `distill`), speculative beam search with strict top-K and relaxed
verification (`speculative`), and next-item recommendation with Recall / NDCG (`recommend`)."""
