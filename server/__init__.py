"""loopgpt.server"""
