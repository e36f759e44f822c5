#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// QEMU-compatible image locking (QEMU's block/file-posix.c): a process
/// takes a shared OFD lock on byte 100+bit for each permission it holds and on
/// byte 200+bit for each permission it will not share. Before taking
/// a permission it checks nobody locks 200+bit; before refusing to share one it
/// checks nobody locks 100+bit. So qbackup and QEMU each refuse while the other writes.
public enum ImageLock {
    /// QEMU's BLK_PERM_* bits.
    public enum Permission: Int, CaseIterable, Sendable {
        case consistentRead = 0, write = 1, writeUnchanged = 2, resize = 3
        var name: String {
            switch self {
            case .consistentRead: "consistent read"
            case .write: "write"
            case .writeUnchanged: "write unchanged"
            case .resize: "resize"
            }
        }
    }

    static let permissionBase: Int64 = 100
    static let sharedBase: Int64 = 200

    /// Takes the locks of a reader (`writable == false`) or writer on `device`'s file.
    /// Throws `locked` naming the conflicting permission, after releasing what it took.
    public static func acquire(_ device: FileDevice, writable: Bool) throws {
        let held: [Permission] = writable ? [.consistentRead, .write, .resize] : [.consistentRead]
        let unshared: [Permission] = [.write, .resize]
        let fd = device.descriptor.rawValue
        device.holdsImageLocks = true
        do {
            for p in held { try lock(fd, permissionBase + Int64(p.rawValue), device) }
            for p in unshared { try lock(fd, sharedBase + Int64(p.rawValue), device) }
        } catch {
            release(fd)
            throw error
        }
        for p in held where isLockedByOthers(fd, sharedBase + Int64(p.rawValue)) {
            release(fd)
            throw inUse(device, byte: sharedBase + Int64(p.rawValue), "does not share \(p.name) access")
        }
        for p in unshared where isLockedByOthers(fd, permissionBase + Int64(p.rawValue)) {
            release(fd)
            throw inUse(device, byte: permissionBase + Int64(p.rawValue),
                        p == .write ? "may be writing it" : "has it open for \(p.name)")
        }
    }

    /// The refusal: who holds the image (/proc tells: `LockHolder`), and how to read it anyway.
    /// No lock byte offset: that is QEMU's business, not the user's.
    static func inUse(_ device: FileDevice, byte: Int64, _ what: String) -> QCowError {
        let who = LockHolder.of(descriptor: device.descriptor.rawValue, byte: byte).map(\.description)
            ?? "another process (a VM or qemu-nbd?)"
        return QCowError(.locked, "the image is in use by \(who), which \(what); stop it first, or read it anyway "
                         + "(the data may be changing) with -U/--force-share of a read-only command", path: device.name,
                         region: "image lock")
    }

    private static func lock(_ fd: Int32, _ byte: Int64, _ device: FileDevice) throws {
        var fl = flock()
        fl.l_type = Int16(F_RDLCK)
        fl.l_whence = Int16(SEEK_SET)
        fl.l_start = off_t(byte)
        fl.l_len = 1
        fl.l_pid = 0
        if fcntl(fd, F_OFD_SETLK, &fl) != 0 {
            let err = errno
            if err == EAGAIN || err == EACCES {
                throw inUse(device, byte: byte, "holds its lock exclusively")
            }
            // File systems without OFD locks: proceed unlocked, as QEMU does when locking is unsupported.
        }
    }

    private static func isLockedByOthers(_ fd: Int32, _ byte: Int64) -> Bool {
        var fl = flock()
        fl.l_type = Int16(F_WRLCK)
        fl.l_whence = Int16(SEEK_SET)
        fl.l_start = off_t(byte)
        fl.l_len = 1
        fl.l_pid = 0
        if fcntl(fd, F_OFD_GETLK, &fl) != 0 { return false }
        return fl.l_type != Int16(F_UNLCK)
    }

    static func release(_ fd: Int32) {
        var fl = flock()
        fl.l_type = Int16(F_UNLCK)
        fl.l_whence = Int16(SEEK_SET)
        fl.l_start = 0
        fl.l_len = 0
        fl.l_pid = 0
        _ = fcntl(fd, F_OFD_SETLK, &fl)
    }
}
