"""The course around the library: what an instructor runs and a notebook calls.

Exercise checks and grading (with the sandbox a student's code runs in), the exercise generator,
notebook tooling, widgets, the notebooks' experiments and figures, the course's synthetic data and
the end-to-end demo. It imports the core library (`lumorik_sft`); the core never imports it.
"""
