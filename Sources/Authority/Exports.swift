// The hand-written encodings are part of what this module offers.
@_exported import Encoding
