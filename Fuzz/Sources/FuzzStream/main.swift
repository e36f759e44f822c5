import CFuzzerDriver
import FuzzTargets

/// libFuzzer on FuzzTargets.stream: a replication stream from bytes, received.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    FuzzTargets.stream(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

@_cdecl("FuzzStream_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var argc = argc
    var argv = argv
    return LLVMFuzzerRunDriver(&argc, &argv) { fuzzOne($0, $1) }
}
