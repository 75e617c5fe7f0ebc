"""Plugins for evaluation harnesses: run StepFlow from lm-evaluation-harness (``stepscope.integrations.lm_eval``)
or lighteval (``stepscope.integrations.lighteval``). Each needs its extra (``pip install 'stepscope[lm-eval]'``,
``'stepscope[lighteval]'``); importing this package needs neither."""
