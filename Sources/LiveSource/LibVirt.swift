import CLibvirt
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// The few libvirt functions `--libvirt` calls, looked up with dlopen/dlsym the first time it
/// runs (the pattern of `LibNBD`): CLibvirt gives only the types and links nothing, so the
/// other commands never load libvirt.so.0 (and its ~56 libraries) and run without it.
struct LibVirt: @unchecked Sendable {
    typealias Connection = OpaquePointer
    typealias Domain = OpaquePointer
    typealias Checkpoint = OpaquePointer

    let connectOpen: @convention(c) (UnsafePointer<CChar>?) -> Connection?
    let connectClose: @convention(c) (Connection?) -> Int32
    let connectGetURI: @convention(c) (Connection?) -> UnsafeMutablePointer<CChar>?
    let lookupByName: @convention(c) (Connection?, UnsafePointer<CChar>?) -> Domain?
    let lookupByUUIDString: @convention(c) (Connection?, UnsafePointer<CChar>?) -> Domain?
    let domainFree: @convention(c) (Domain?) -> Int32
    let domainGetName: @convention(c) (Domain?) -> UnsafePointer<CChar>?
    let domainGetUUIDString: @convention(c) (Domain?, UnsafeMutablePointer<CChar>?) -> Int32
    let domainGetState: @convention(c) (Domain?, UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<Int32>?, UInt32) -> Int32
    let domainGetXMLDesc: @convention(c) (Domain?, UInt32) -> UnsafeMutablePointer<CChar>?
    let domainGetBlockInfo: @convention(c) (Domain?, UnsafePointer<CChar>?, UnsafeMutablePointer<virDomainBlockInfo>?, UInt32)
        -> Int32
    let backupBegin: @convention(c) (Domain?, UnsafePointer<CChar>?, UnsafePointer<CChar>?, UInt32) -> Int32
    let backupGetXMLDesc: @convention(c) (Domain?, UInt32) -> UnsafeMutablePointer<CChar>?
    let abortJob: @convention(c) (Domain?) -> Int32
    let getJobStats: @convention(c) (Domain?, UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<virTypedParameterPtr?>?,
                                     UnsafeMutablePointer<Int32>?, UInt32) -> Int32
    let typedParamsGetULLong: @convention(c) (virTypedParameterPtr?, Int32, UnsafePointer<CChar>?,
                                              UnsafeMutablePointer<UInt64>?) -> Int32
    let typedParamsGetInt: @convention(c) (virTypedParameterPtr?, Int32, UnsafePointer<CChar>?,
                                           UnsafeMutablePointer<Int32>?) -> Int32
    let typedParamsFree: @convention(c) (virTypedParameterPtr?, Int32) -> Void
    let listAllCheckpoints: @convention(c) (Domain?, UnsafeMutablePointer<UnsafeMutablePointer<Checkpoint?>?>?, UInt32)
        -> Int32
    let checkpointLookupByName: @convention(c) (Domain?, UnsafePointer<CChar>?, UInt32) -> Checkpoint?
    let checkpointGetName: @convention(c) (Checkpoint?) -> UnsafePointer<CChar>?
    let checkpointGetXMLDesc: @convention(c) (Checkpoint?, UInt32) -> UnsafeMutablePointer<CChar>?
    let checkpointDelete: @convention(c) (Checkpoint?, UInt32) -> Int32
    let checkpointFree: @convention(c) (Checkpoint?) -> Int32
    let getLastError: @convention(c) () -> virErrorPtr?
    let setErrorFunc: @convention(c) (UnsafeMutableRawPointer?, virErrorFunc?) -> Void

    /// The soname of Debian's libvirt0 (the runtime package of libvirt-dev).
    static let soname = "libvirt.so.0"

    /// The library, loaded once; throws (every time) when it cannot be loaded.
    static func shared() throws -> LibVirt {
        try loaded.get()
    }

    private static let loaded: Result<LibVirt, LiveError> = Result { try LibVirt.load() }.mapError {
        $0 as? LiveError ?? LiveError(.unsupported, "\($0)")
    }

    private static func load() throws -> LibVirt {
        let lib = try SharedLibrary(soname, needed: { why in
            "--libvirt needs libvirt (\(why)); install it with: apt-get install -y libvirt0"
        }, minimum: "libvirt 7.2")
        func sym<T>(_ name: String, _ type: T.Type) throws -> T { try lib.symbol(name, type) }
        let table = LibVirt(
            connectOpen: try sym("virConnectOpen", (@convention(c) (UnsafePointer<CChar>?) -> Connection?).self),
            connectClose: try sym("virConnectClose", (@convention(c) (Connection?) -> Int32).self),
            connectGetURI: try sym("virConnectGetURI", (@convention(c) (Connection?) -> UnsafeMutablePointer<CChar>?).self),
            lookupByName: try sym("virDomainLookupByName",
                                  (@convention(c) (Connection?, UnsafePointer<CChar>?) -> Domain?).self),
            lookupByUUIDString: try sym("virDomainLookupByUUIDString",
                                        (@convention(c) (Connection?, UnsafePointer<CChar>?) -> Domain?).self),
            domainFree: try sym("virDomainFree", (@convention(c) (Domain?) -> Int32).self),
            domainGetName: try sym("virDomainGetName", (@convention(c) (Domain?) -> UnsafePointer<CChar>?).self),
            domainGetUUIDString: try sym("virDomainGetUUIDString",
                                         (@convention(c) (Domain?, UnsafeMutablePointer<CChar>?) -> Int32).self),
            domainGetState: try sym("virDomainGetState",
                                    (@convention(c) (Domain?, UnsafeMutablePointer<Int32>?, UnsafeMutablePointer<Int32>?,
                                                     UInt32) -> Int32).self),
            domainGetXMLDesc: try sym("virDomainGetXMLDesc",
                                      (@convention(c) (Domain?, UInt32) -> UnsafeMutablePointer<CChar>?).self),
            domainGetBlockInfo: try sym("virDomainGetBlockInfo",
                                        (@convention(c) (Domain?, UnsafePointer<CChar>?,
                                                         UnsafeMutablePointer<virDomainBlockInfo>?, UInt32) -> Int32).self),
            backupBegin: try sym("virDomainBackupBegin",
                                 (@convention(c) (Domain?, UnsafePointer<CChar>?, UnsafePointer<CChar>?, UInt32) -> Int32).self),
            backupGetXMLDesc: try sym("virDomainBackupGetXMLDesc",
                                      (@convention(c) (Domain?, UInt32) -> UnsafeMutablePointer<CChar>?).self),
            abortJob: try sym("virDomainAbortJob", (@convention(c) (Domain?) -> Int32).self),
            getJobStats: try sym("virDomainGetJobStats",
                                 (@convention(c) (Domain?, UnsafeMutablePointer<Int32>?,
                                                  UnsafeMutablePointer<virTypedParameterPtr?>?,
                                                  UnsafeMutablePointer<Int32>?, UInt32) -> Int32).self),
            typedParamsGetULLong: try sym("virTypedParamsGetULLong",
                                          (@convention(c) (virTypedParameterPtr?, Int32, UnsafePointer<CChar>?,
                                                           UnsafeMutablePointer<UInt64>?) -> Int32).self),
            typedParamsGetInt: try sym("virTypedParamsGetInt",
                                       (@convention(c) (virTypedParameterPtr?, Int32, UnsafePointer<CChar>?,
                                                        UnsafeMutablePointer<Int32>?) -> Int32).self),
            typedParamsFree: try sym("virTypedParamsFree", (@convention(c) (virTypedParameterPtr?, Int32) -> Void).self),
            listAllCheckpoints: try sym("virDomainListAllCheckpoints",
                                        (@convention(c) (Domain?, UnsafeMutablePointer<UnsafeMutablePointer<Checkpoint?>?>?,
                                                         UInt32) -> Int32).self),
            checkpointLookupByName: try sym("virDomainCheckpointLookupByName",
                                            (@convention(c) (Domain?, UnsafePointer<CChar>?, UInt32) -> Checkpoint?).self),
            checkpointGetName: try sym("virDomainCheckpointGetName",
                                       (@convention(c) (Checkpoint?) -> UnsafePointer<CChar>?).self),
            checkpointGetXMLDesc: try sym("virDomainCheckpointGetXMLDesc",
                                          (@convention(c) (Checkpoint?, UInt32) -> UnsafeMutablePointer<CChar>?).self),
            checkpointDelete: try sym("virDomainCheckpointDelete", (@convention(c) (Checkpoint?, UInt32) -> Int32).self),
            checkpointFree: try sym("virDomainCheckpointFree", (@convention(c) (Checkpoint?) -> Int32).self),
            getLastError: try sym("virGetLastError", (@convention(c) () -> virErrorPtr?).self),
            setErrorFunc: try sym("virSetErrorFunc", (@convention(c) (UnsafeMutableRawPointer?, virErrorFunc?) -> Void).self))
        // libvirt's default handler prints every error to stderr; qbackup reports them itself.
        table.setErrorFunc(nil) { _, _ in }
        return table
    }

    /// libvirt's last error on this thread: its code (virErrorNumber) and message.
    func lastError() -> (code: Int32, message: String) {
        guard let error = getLastError() else { return (0, "unknown libvirt error") }
        let message = error.pointee.message.map { String(cString: $0) } ?? "unknown libvirt error"
        return (error.pointee.code, message)
    }

    /// A string libvirt allocated, freed.
    static func take(_ pointer: UnsafeMutablePointer<CChar>?) -> String? {
        guard let pointer else { return nil }
        defer { free(pointer) }
        return String(cString: pointer)
    }
}
