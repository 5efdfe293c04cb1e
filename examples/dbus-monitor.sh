#!/bin/sh
# dbus-monitor.sh — watch incoming NES messages on the session bus (nesd must run in
# this desktop session). The one-liner:
#
#   dbus-monitor --session "type='signal',interface='org.nes.Messenger1',member='MessageReceived'"
#
# prints each MessageReceived(id, from, timestamp, text) signal. The same with GLib's tool:
#
#   gdbus monitor --session --dest org.nes.Messenger1 --object-path /org/nes/Messenger1
exec dbus-monitor --session "type='signal',interface='org.nes.Messenger1',member='MessageReceived'"
