"""loopgpt.export"""
