import CNBD
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// The few libnbd functions qbackup calls, looked up with dlopen/dlsym the first
/// time a live mode runs. The C header gives only the types (CNBD links
/// nothing), so `qbackup --version` and the offline commands never load libnbd
/// and run on a host that does not have it.
struct LibNBD: @unchecked Sendable {
    typealias Handle = OpaquePointer

    let create: @convention(c) () -> Handle?
    let close: @convention(c) (Handle?) -> Void
    let getError: @convention(c) () -> UnsafePointer<CChar>?
    let getErrno: @convention(c) () -> Int32
    let getVersion: @convention(c) (Handle?) -> UnsafePointer<CChar>?
    let addMetaContext: @convention(c) (Handle?, UnsafePointer<CChar>?) -> Int32
    let aioConnectURI: @convention(c) (Handle?, UnsafePointer<CChar>?) -> Int32
    let setURIAllowLocalFile: @convention(c) (Handle?, Bool) -> Int32
    let aioIsConnecting: @convention(c) (Handle?) -> Int32
    let aioIsReady: @convention(c) (Handle?) -> Int32
    let poll: @convention(c) (Handle?, Int32) -> Int32
    let getSize: @convention(c) (Handle?) -> Int64
    let getBlockSize: @convention(c) (Handle?, Int32) -> Int64
    let canMetaContext: @convention(c) (Handle?, UnsafePointer<CChar>?) -> Int32
    let canMultiConn: @convention(c) (Handle?) -> Int32
    let aioPread: @convention(c) (Handle?, UnsafeMutableRawPointer?, Int, UInt64, nbd_completion_callback, UInt32) -> Int64
    let aioBlockStatus: @convention(c) (Handle?, UInt64, UInt64, nbd_extent_callback, nbd_completion_callback, UInt32)
        -> Int64
    let aioCommandCompleted: @convention(c) (Handle?, UInt64) -> Int32
    let aioPeekCommandCompleted: @convention(c) (Handle?) -> Int64
    let aioGetFd: @convention(c) (Handle?) -> Int32
    let aioGetDirection: @convention(c) (Handle?) -> UInt32
    let aioNotifyRead: @convention(c) (Handle?) -> Int32
    let aioNotifyWrite: @convention(c) (Handle?) -> Int32
    let shutdown: @convention(c) (Handle?, UInt32) -> Int32
    let setPreadInitialize: @convention(c) (Handle?, Bool) -> Int32

    /// The soname of Debian's libnbd0 (the runtime package of libnbd-dev).
    static let soname = "libnbd.so.0"

    /// The library, loaded once; throws (every time) when it cannot be loaded.
    static func shared() throws -> LibNBD {
        try loaded.get()
    }

    private static let loaded: Result<LibNBD, LiveError> = Result { try LibNBD.load() }.mapError {
        $0 as? LiveError ?? LiveError(.unsupported, "\($0)")
    }

    private static func load() throws -> LibNBD {
        let lib = try SharedLibrary(soname, needed: { why in
            "live backups need libnbd (\(why)); install it with: apt-get install -y libnbd0"
        }, minimum: "libnbd 1.14")
        func sym<T>(_ name: String, _ type: T.Type) throws -> T { try lib.symbol(name, type) }
        return LibNBD(
            create: try sym("nbd_create", (@convention(c) () -> Handle?).self),
            close: try sym("nbd_close", (@convention(c) (Handle?) -> Void).self),
            getError: try sym("nbd_get_error", (@convention(c) () -> UnsafePointer<CChar>?).self),
            getErrno: try sym("nbd_get_errno", (@convention(c) () -> Int32).self),
            getVersion: try sym("nbd_get_version", (@convention(c) (Handle?) -> UnsafePointer<CChar>?).self),
            addMetaContext: try sym("nbd_add_meta_context", (@convention(c) (Handle?, UnsafePointer<CChar>?) -> Int32).self),
            aioConnectURI: try sym("nbd_aio_connect_uri", (@convention(c) (Handle?, UnsafePointer<CChar>?) -> Int32).self),
            setURIAllowLocalFile: try sym("nbd_set_uri_allow_local_file", (@convention(c) (Handle?, Bool) -> Int32).self),
            aioIsConnecting: try sym("nbd_aio_is_connecting", (@convention(c) (Handle?) -> Int32).self),
            aioIsReady: try sym("nbd_aio_is_ready", (@convention(c) (Handle?) -> Int32).self),
            poll: try sym("nbd_poll", (@convention(c) (Handle?, Int32) -> Int32).self),
            getSize: try sym("nbd_get_size", (@convention(c) (Handle?) -> Int64).self),
            getBlockSize: try sym("nbd_get_block_size", (@convention(c) (Handle?, Int32) -> Int64).self),
            canMetaContext: try sym("nbd_can_meta_context", (@convention(c) (Handle?, UnsafePointer<CChar>?) -> Int32).self),
            canMultiConn: try sym("nbd_can_multi_conn", (@convention(c) (Handle?) -> Int32).self),
            aioPread: try sym("nbd_aio_pread", (@convention(c) (Handle?, UnsafeMutableRawPointer?, Int, UInt64,
                                                              nbd_completion_callback, UInt32) -> Int64).self),
            aioBlockStatus: try sym("nbd_aio_block_status",
                                    (@convention(c) (Handle?, UInt64, UInt64, nbd_extent_callback, nbd_completion_callback,
                                                     UInt32) -> Int64).self),
            aioCommandCompleted: try sym("nbd_aio_command_completed", (@convention(c) (Handle?, UInt64) -> Int32).self),
            aioPeekCommandCompleted: try sym("nbd_aio_peek_command_completed", (@convention(c) (Handle?) -> Int64).self),
            aioGetFd: try sym("nbd_aio_get_fd", (@convention(c) (Handle?) -> Int32).self),
            aioGetDirection: try sym("nbd_aio_get_direction", (@convention(c) (Handle?) -> UInt32).self),
            aioNotifyRead: try sym("nbd_aio_notify_read", (@convention(c) (Handle?) -> Int32).self),
            aioNotifyWrite: try sym("nbd_aio_notify_write", (@convention(c) (Handle?) -> Int32).self),
            shutdown: try sym("nbd_shutdown", (@convention(c) (Handle?, UInt32) -> Int32).self),
            setPreadInitialize: try sym("nbd_set_pread_initialize", (@convention(c) (Handle?, Bool) -> Int32).self))
    }

    /// libnbd's message for the last failed call on this thread.
    func lastError() -> String {
        let message = getError().map { String(cString: $0) } ?? ""
        return message.isEmpty ? "unknown libnbd error (errno \(getErrno()))" : message
    }
}
