"""The bottom of the package: the bundle and its manifest, the typed records stages read and
write, what this machine is, and console capture. Imports only options and errors."""
