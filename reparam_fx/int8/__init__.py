"""int8 deployment: a fusion policy for int8 back ends, calibration, lowering, SQNR.

    fused = reparam_fx.fuse(model.eval(), target="int8")   # still exact in float
    print(fused.fusion_report.int8)                       # what the policy did, per conv
"""
