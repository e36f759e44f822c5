extension QCowChecker {
    /// Opens one image file for checking (its backing chain is not needed),
    /// writable and allowing a corrupt or dirty image when `repair` is set. `lock` false
    /// (-U, without a repair only) opens it without QEMU's image lock.
    public static func open(_ path: String, repair: RepairMode, lock: Bool = true) throws -> QCowFile {
        let writable = repair != .none
        return try ImageOpener.openQCow(path, writable: writable, lock: lock || writable, forCheck: true)
    }
}
