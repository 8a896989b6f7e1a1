"""loopgpt.loadtest"""
