"""What follows pre-training: PAWS-NN evaluation, tightening (Appendix C), fine-tuning
(Appendix A) and the supervised-only baseline. Each step takes a model, the data and the config
and returns a model or a report; :mod:`paws.pretrain` calls the ones a run ends with."""
