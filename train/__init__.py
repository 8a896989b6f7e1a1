"""loopgpt.train"""
