"""The embedded base model's recipe: its offline corpus (`corpus`), pretraining (`pretrain`), card.

A maintainer reruns it (`lumorik-sft pretrain`) to rebuild the committed weights bit for bit on the
kind of CPU the model card names. It imports the core library; the core never imports it.
"""
