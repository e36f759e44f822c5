import CFuzzerDriver
import FuzzTargets

/// libFuzzer on FuzzTargets.repair: check --repair all on a qcow2 image from bytes, then a fresh check.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    FuzzTargets.repair(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

@_cdecl("FuzzRepair_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var argc = argc
    var argv = argv
    return LLVMFuzzerRunDriver(&argc, &argv) { fuzzOne($0, $1) }
}
