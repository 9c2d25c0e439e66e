"""Evaluation of generated samples: image statistics, anatomical plausibility, reports, register inspection."""
