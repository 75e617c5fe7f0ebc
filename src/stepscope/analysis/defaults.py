"""Defaults of the flow analysis that the command line needs before anything heavy is imported."""

# Sampling for a paired (within-problem) analysis: several responses per problem at a temperature that makes both
# outcomes occur on the same problem. Used by ``stepscope analyze`` when it generates the traces itself.
PAIRED_SAMPLES = 8
PAIRED_TEMPERATURE = 0.7
