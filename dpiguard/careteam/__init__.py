"""careteam"""
