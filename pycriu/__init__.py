"""pycriu"""
