import Foundation
import QCowImage

/// Opens an image writable, retrying briefly while it is `.locked`.
///
/// Tests run in parallel threads that spawn QEMU tools; a child between fork
/// and exec still holds copies of our descriptors (close-on-exec closes them
/// only at exec), so an image we just closed can look locked for a moment.
public func openWritableRetryingLock(_ path: String, format: ImageOpener.Format? = nil) throws -> GuestImage {
    var attempt = 0
    while true {
        do {
            return try ImageOpener.open(path, format: format, writable: true)
        } catch let error as QCowError where error.code == .locked && attempt < 50 {
            attempt += 1
            usleep(20_000)
        }
    }
}

/// Opens an image (read-only or writable), retrying briefly while it is `.locked`; see above.
public func openRetryingLock(_ path: String, format: ImageOpener.Format? = nil, writable: Bool) throws -> GuestImage {
    var attempt = 0
    while true {
        do {
            return try ImageOpener.open(path, format: format, writable: writable)
        } catch let error as QCowError where error.code == .locked && attempt < 50 {
            attempt += 1
            usleep(20_000)
        }
    }
}
