"""``python -m lumorik_sft.course.grading``: see :mod:`lumorik_sft.course.grading.cli`."""

import sys

from lumorik_sft.course.grading.cli import main

sys.exit(main())
