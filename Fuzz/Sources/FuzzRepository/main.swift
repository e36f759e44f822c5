import CFuzzerDriver
import FuzzTargets

/// libFuzzer on FuzzTargets.repository: a repository (manifest and layer files) from bytes.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    FuzzTargets.repository(UnsafeRawBufferPointer(start: data, count: size))
    return 0
}

@_cdecl("FuzzRepository_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var argc = argc
    var argv = argv
    return LLVMFuzzerRunDriver(&argc, &argv) { fuzzOne($0, $1) }
}
